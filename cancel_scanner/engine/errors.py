"""Classifies database errors once: transient (retry the batch later), environment (a person must fix
the database's setup; no row is at fault), or neither (a bug, or one row's data)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc

# MySQL/MariaDB error numbers that say "try again", not "your data is wrong".
_TRANSIENT_MYSQL_CODES = {
    1040,  # too many connections
    1047,  # Galera: "WSREP has not yet prepared node for application use" (a node joining or out of the primary component)
    1053,  # server shutdown in progress
    1152,  # aborted connection
    1158,  # error reading communication packets
    1159,  # timeout reading communication packets
    1160,  # error writing communication packets
    1161,  # timeout writing communication packets
    1180,  # got error during COMMIT
    1317,  # query execution was interrupted (the server stopping, KILL QUERY)
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
    return isinstance(exc, sa_exc.InterfaceError)


# The database refuses the work for reasons no row can fix: privileges, a schema that lacks a
# table or column (an upgrade not migrated), a read-only server. The stage backs off and alerts;
# no row spends an attempt or ends 1/0 for it.
_ENVIRONMENT_MYSQL_CODES = {
    1044,  # access denied to database
    1045,  # access denied for user (password)
    1142,  # command denied to user for table (a revoked privilege)
    1143,  # column command denied
    1146,  # table doesn't exist
    1054,  # unknown column
    1290,  # running with --read-only (or another option that prevents this statement)
    1036,  # table is read only
    1792,  # cannot execute statement in a READ ONLY transaction
    1836,  # running in read-only mode
    1227,  # access denied; you need the SUPER privilege (or similar)
    1370,  # execute command denied
}
_ENVIRONMENT_SQLITE_TEXT = (
    "no such table",
    "no such column",
    "readonly database",
    "read-only",
    "unable to open database",
)


def _db_error_is(exc: BaseException, mysql_codes: set[int], sqlite_text: tuple[str, ...]) -> bool:
    """A database error whose MySQL code is one of ``mysql_codes``, or whose SQLite text has one of ``sqlite_text``."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    code = mysql_code(exc)
    if code is not None:
        return code in mysql_codes
    text = str(exc.orig).lower() if exc.orig is not None else ""
    return any(fragment in text for fragment in sqlite_text)


def is_environment_db_error(exc: BaseException) -> bool:
    return _db_error_is(exc, _ENVIRONMENT_MYSQL_CODES, _ENVIRONMENT_SQLITE_TEXT)


_SCHEMA_MYSQL_CODES = {1054, 1146}  # unknown column, no such table
_SCHEMA_SQLITE_TEXT = ("no such table", "no such column")


def is_schema_db_error(exc: BaseException) -> bool:
    """The schema lacks what the code needs: an upgrade that was not migrated, not an outage."""
    return _db_error_is(exc, _SCHEMA_MYSQL_CODES, _SCHEMA_SQLITE_TEXT)


def describe_db_error(exc: BaseException) -> str:
    """One line for logs and status: the server's code and message, never the statement or parameters.

    SQLAlchemy's own str() appends the SQL and its bound values; those may hold merchant
    input, and a connection error's text must never be able to echo a URL.
    """
    orig: Any = getattr(exc, "orig", None)
    code = mysql_code(exc)
    message = str(orig.args[1] if code is not None and len(orig.args) > 1 else (orig or exc))
    first = message.splitlines()[0] if message else type(exc).__name__
    hint = "; the schema is behind this cancel-scanner: run `cancel-scanner migrate`" if is_schema_db_error(exc) else ""
    return f"{type(exc).__name__}" + (f" {code}" if code is not None else "") + f": {first[:200]}{hint}"


def is_lost_race(exc: BaseException) -> bool:
    """A transaction the database rolled back because another one won: a deadlock on one server, a
    certification failure on a Galera cluster (both 1213). Nothing of ours was written: look again."""
    return _db_error_is(exc, {1213}, ()) and isinstance(exc, sa_exc.OperationalError)


# The shop's database refused one row's write: a trigger's SIGNAL, a constraint the row would break.
# The row is at fault (or the shop's rule is), never the database: the rest of the batch goes on.
SHOP_REFUSED = "SHOP_REFUSED"
_REFUSAL_MYSQL_CODES = {
    1644: "a shop trigger",  # SIGNAL SQLSTATE '45000'
    1062: "a unique key",
    1451: "a foreign key",
    1452: "a foreign key",
    3819: "a CHECK constraint",  # MySQL 8
    4025: "a CHECK constraint",  # MariaDB
    1048: "a NOT NULL column",
    1264: "a value out of its column's range",
    1690: "a value out of its column's range",
    1406: "a value too long for its column",
    1366: "a value of the wrong type for its column",
}
_REFUSAL_SQLITE_TEXT = {
    "unique constraint failed": _REFUSAL_MYSQL_CODES[1062],
    "check constraint failed": _REFUSAL_MYSQL_CODES[4025],
    "foreign key constraint failed": _REFUSAL_MYSQL_CODES[1452],
    "not null constraint failed": _REFUSAL_MYSQL_CODES[1048],
}
_TRIGGER = _REFUSAL_MYSQL_CODES[1644]
# A trigger's own message (SIGNAL ... MESSAGE_TEXT, SQLite's RAISE) is the shop's text for a person:
# kept, but only its printable part and short, and never the statement or its values.
_SHOP_TEXT_CHARS = 80


def shop_refusal(exc: BaseException) -> str | None:
    """Why the shop's database refused one row's write, in words a merchant can act on; None if it did not."""
    if not isinstance(exc, sa_exc.DBAPIError) or is_transient_db_error(exc) or is_environment_db_error(exc):
        return None
    code = mysql_code(exc)
    if code is not None:
        if code not in _REFUSAL_MYSQL_CODES:
            return None
        why: str | None = _REFUSAL_MYSQL_CODES[code]
        if code == 1644:
            args = exc.orig.args if exc.orig is not None else ()  # a MySQL code comes from exc.orig
            said = _printable(str(args[1]) if len(args) > 1 else "")
            why = f"{_TRIGGER} said: {said}" if said else _TRIGGER
        return f"the shop's database refused the write ({why})"
    if not isinstance(exc, sa_exc.IntegrityError):
        return None
    text = str(exc.orig) if exc.orig is not None else ""
    why = next((phrase for fragment, phrase in _REFUSAL_SQLITE_TEXT.items() if fragment in text.lower()), None)
    if why is None:
        # SQLite's RAISE(ABORT, 'message') in a trigger: an IntegrityError carrying the shop's message alone.
        said = _printable(text)
        why = f"{_TRIGGER} said: {said}" if said else _TRIGGER
    return f"the shop's database refused the write ({why})"


def _printable(text: str) -> str:
    kept = "".join(ch for ch in text if ch.isprintable()).strip()
    return kept if len(kept) <= _SHOP_TEXT_CHARS else kept[: _SHOP_TEXT_CHARS - 1] + "…"
