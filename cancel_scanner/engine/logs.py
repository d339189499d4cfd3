"""Logging: loguru for our events; the stdlib loggers of APScheduler and SQLAlchemy routed into it.

Records are events with bound fields (stage, row_id, out_refund_no, action).
Human-readable by default, one JSON object per line with ``--log-json``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from loguru import logger

_HUMAN = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[stage]}</cyan> {message}{extra_text}"
)
_QUIET_FIELDS = {"stage"}


class _InterceptHandler(logging.Handler):
    """Send a stdlib record to loguru at the same level, naming its logger."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(stage=record.name).log(level, record.getMessage())


def _extra_text(record) -> str:
    fields = {k: v for k, v in record["extra"].items() if k not in _QUIET_FIELDS}
    return "".join(f" {k}={v}" for k, v in fields.items())


def _human_format(record) -> str:
    record["extra"].setdefault("stage", "-")
    record["extra_text"] = _extra_text(record).replace("{", "{{").replace("}", "}}").replace("<", r"\<")
    return _HUMAN + "\n{exception}"


def _json_sink(stream: TextIO):
    def write(message) -> None:
        record = message.record
        doc = {
            "time": record["time"].isoformat(),
            "level": record["level"].name,
            "message": record["message"],
            **{k: v for k, v in record["extra"].items()},
        }
        if record["exception"] is not None:
            doc["exception"] = repr(record["exception"].value)
        stream.write(json.dumps(doc, default=str, ensure_ascii=False) + "\n")
        stream.flush()

    return write


class _RoutineNotice(logging.Filter):
    """Lowers to DEBUG library messages that are routine for this daemon.

    - APScheduler warns when a run is skipped because the stage is still busy with the last
      one; the daemon coalesces those on purpose (a busy stage re-runs when it finishes).
    - SQLAlchemy's pool logs an ERROR when it cannot roll back or close a connection whose
      server has gone away; during an outage the daemon already reports it once per backoff
      step, and the pool drops the dead connection (pre-ping heals the rest).
    """

    ROUTINE = (
        "maximum number of running instances reached",
        "Exception during reset or similar",
        "Exception closing connection",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if any(text in record.getMessage() for text in self.ROUTINE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
        return True


def setup_logging(*, json_lines: bool = False, level: str = "INFO", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    logger.remove()
    # diagnose=False at every level and in every format: loguru's diagnose prints the value of
    # every variable in a traceback's frames, and those include database URLs with passwords,
    # key material and bank details.
    if json_lines:
        logger.add(_json_sink(stream), level=level, enqueue=False, diagnose=False, backtrace=False)
    else:
        logger.add(
            stream,
            level=level,
            format=_human_format,
            colorize=stream.isatty(),
            enqueue=False,
            diagnose=False,
            backtrace=False,
        )
    handler = _InterceptHandler()
    handler.addFilter(_RoutineNotice())
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)
    # APScheduler's INFO lines ("Job executed successfully") every two seconds are noise;
    # its warnings (missed runs) are what an operator needs.
    for name, lvl in (("apscheduler", logging.WARNING), ("sqlalchemy", logging.WARNING)):
        logging.getLogger(name).setLevel(lvl)


# --- events that happen in a savepoint ---------------------------------------------------------
# A batch's writes may be tried more than once (engine.isolate halves a batch whose write the shop
# refused), and a try may be undone. The events a try logs ("refund accepted", "will retry") are held
# while it runs and written only if its savepoint commits, so each is logged once, and never for a
# write that was undone.

_held: ContextVar[list[Callable[[], None]] | None] = ContextVar("cancel_scanner_held_logs", default=None)


def on_commit(write: Callable[[], None]) -> None:
    """Run ``write`` (a log call) now, or when the try it happens in commits."""
    held = _held.get()
    if held is None:
        write()
    else:
        held.append(write)


@contextmanager
def held_until_commit() -> Iterator[list[Callable[[], None]]]:
    """Hold the events logged inside; ``release`` them (after the block) once their try committed."""
    held: list[Callable[[], None]] = []
    token = _held.set(held)
    try:
        yield held
    finally:
        _held.reset(token)


def release(held: list[Callable[[], None]]) -> None:
    """Write held events now, or on to the try that encloses this one."""
    for write in held:
        on_commit(write)


class EventLog:
    """``logger.bind(**fields)`` whose records wait for the try they happen in to commit (on_commit)."""

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def bind(self, **fields: Any) -> EventLog:
        return EventLog(**self._fields, **fields)

    def log(self, level: str, message: str, *args: Any) -> None:
        fields = self._fields
        on_commit(lambda: logger.bind(**fields).log(level, message, *args))

    def info(self, message: str, *args: Any) -> None:
        self.log("INFO", message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log("WARNING", message, *args)

    def error(self, message: str, *args: Any) -> None:
        self.log("ERROR", message, *args)
