"""`cancel-scanner reconcile`: not built yet."""

command = None
