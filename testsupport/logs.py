"""What the product logs while a test runs, as lines of text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger


@contextmanager
def log_lines(format: str, level: str = "DEBUG", **options: Any) -> Iterator[list[str]]:
    """Every log record at ``level`` or above while the block runs, each rendered with ``format``
    (loguru's; ``{exception}`` adds the traceback); ``options`` go to ``logger.add`` (a ``filter``)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level=level, format=format, diagnose=False, **options)
    try:
        yield lines
    finally:
        logger.remove(sink)
