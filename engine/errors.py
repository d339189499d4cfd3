"""Classifies database errors once: transient (retry the batch later) or not."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

# MySQL/MariaDB error numbers that say "try again", not "your data is wrong".
_TRANSIENT_MYSQL_CODES = {
    1040,  # too many connections
    1205,  # lock wait timeout
    1213,  # deadlock
    1927,  # connection was killed (MariaDB)
    2003,  # can't connect
    2006,  # server has gone away
    2013,  # lost connection during query
    2055,  # lost connection (pymysql)
    4031,  # disconnected for inactivity
}


def mysql_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", None)
    args = getattr(orig, "args", None)
    if args and isinstance(args[0], int):
        return args[0]
    return None


def is_transient_db_error(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if isinstance(exc, sa_exc.OperationalError):
        code = mysql_code(exc)
        if code is not None:
            return code in _TRANSIENT_MYSQL_CODES
        text = str(exc.orig).lower() if exc.orig is not None else ""
        return "locked" in text or "busy" in text or "disk i/o" in text
    if isinstance(exc, sa_exc.InterfaceError):
        return True
    return False
