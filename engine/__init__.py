"""The engine: claims rows, runs stages in short transactions, retries, schedules."""

__version__ = "0.1.0"
