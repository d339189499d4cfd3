"""`cancel-scanner reissue`: not built yet."""

command = None
