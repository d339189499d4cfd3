"""`cancel-scanner prune`: not built yet."""

command = None
