"""One clock: the database's.

Leases, due times and heartbeats are compared by every daemon sharing the
database, so they must all be read off one clock. Each daemon's own wall clock
may be minutes off (a host without NTP, a VM resumed from a snapshot); the
database's is the one they all see. A batch reads it once, in its own short
round trip.

The daemon's wall clock still matters in one place we do not control: WeChat
Pay refuses a request signature whose timestamp is more than 5 minutes off its
own time. ``ClockWatch`` measures our offset to the database and says so
loudly when it is large enough to matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from loguru import logger
from sqlalchemy import Connection, Engine, text

# A call is not started with less time than this left before its deadline (a lease, the
# heartbeat window): it could only end as a timeout, an unknown outcome, where not sending is a
# known one. The runner sizes claims with it; the gateway refuses to start a call without it.
MIN_CALL_SECONDS = 1.0


# Past this our leases are still safe (they use the database's clock) but logs and anything
# stamped locally drift from the database's: worth a warning.
CLOCK_OFFSET_WARN_SECONDS = 2.0
# WeChat refuses signatures more than 300 s off its clock: loud from 30 s before that.
CLOCK_OFFSET_SIGNATURE_SECONDS = 270.0

_log = logger.bind(stage="clock")


def truncate_ms(value: datetime) -> datetime:
    """Naive UTC with millisecond precision, as DATETIME(3) stores it."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def local_utcnow() -> datetime:
    """This host's wall clock (naive UTC, milliseconds). For display and offsets only."""
    return truncate_ms(datetime.now(UTC).replace(tzinfo=None))


def read_db_now(conn: Connection) -> datetime:
    """The database server's current time, naive UTC, milliseconds."""
    if conn.dialect.name in ("mysql", "mariadb"):
        # UTC_TIMESTAMP does not depend on the session time zone.
        value = conn.execute(text("SELECT UTC_TIMESTAMP(3)")).scalar_one()
    else:
        value = conn.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return truncate_ms(value)


class DbClock:
    """``clock()`` -> the database's now. The engine's default clock."""

    def __init__(self, db: Engine):
        self.db = db

    def __call__(self) -> datetime:
        with self.db.connect() as conn:
            return read_db_now(conn)

    def offset_seconds(self) -> float:
        """Our wall clock minus the database's, corrected for half the round trip."""
        before = time.time()
        with self.db.connect() as conn:
            db_now = read_db_now(conn)
        after = time.time()
        ours = datetime.fromtimestamp((before + after) / 2, UTC).replace(tzinfo=None)
        return (ours - db_now).total_seconds()


@dataclass
class ClockWatch:
    """Checks this host's clock against the database's and reports a large offset once per change."""

    measure: Callable[[], float]
    warn_seconds: float = CLOCK_OFFSET_WARN_SECONDS
    signature_seconds: float = CLOCK_OFFSET_SIGNATURE_SECONDS
    last_level: str | None = None
    last_offset: float | None = None

    def check(self) -> float | None:
        try:
            offset = self.measure()
        except Exception as exc:  # noqa: BLE001 - the database may be down; the stages report that themselves
            _log.bind(action="clock_check_failed").debug("could not read the database's clock: {}", type(exc).__name__)
            return None
        self.last_offset = offset
        level = self._level(offset)
        if level != self.last_level:
            self._report(level, offset)
            self.last_level = level
        return offset

    def _level(self, offset: float) -> str:
        if abs(offset) > self.signature_seconds:
            return "ERROR"
        if abs(offset) > self.warn_seconds:
            return "WARNING"
        return "INFO"

    def _report(self, level: str, offset: float) -> None:
        log = _log.bind(action="clock_offset", offset_seconds=round(offset, 3))
        if level == "ERROR":
            log.error(
                "this host's clock is {:+.1f} s off the database's: WeChat Pay refuses signatures more than 300 s off"
                " (SIGN_ERROR); fix NTP on this host. Leases are safe: they use the database's clock",
                offset,
            )
        elif level == "WARNING":
            log.warning("this host's clock is {:+.1f} s off the database's; leases use the database's clock", offset)
        elif self.last_level is not None:
            log.info(
                "this host's clock is back within {:.0f} s of the database's ({:+.1f} s)", self.warn_seconds, offset
            )
