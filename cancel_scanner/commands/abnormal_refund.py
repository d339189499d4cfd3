"""`cancel-scanner abnormal_refund`: not built yet."""

command = None
