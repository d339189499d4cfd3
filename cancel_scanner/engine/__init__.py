"""The engine: claims rows, runs stages in short transactions, retries, schedules."""
