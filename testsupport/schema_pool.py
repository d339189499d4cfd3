"""Databases holding the schema, built once and handed out clean again and again.

A MariaDB test that wants the schema used to get a fresh database and its tables and view built
(``init_schema``), then dropped. ``SchemaPool`` builds a database once, and when a test is done with
it, puts it back only if the test left the schema exactly as built; then it deletes the rows the
test wrote, puts back the rows the schema came with (``cancel_scanner_schema``'s) and resets
every AUTO_INCREMENT the test moved, so the next test sees what a fresh database shows. A
database whose schema a test changed (a migration test's dropped index, an added column, a view,
a grant), or that cannot be cleaned, is dropped and a new one is built for the next test.

The comparison is of everything ``information_schema`` says about the database: tables and their
options, columns, indexes, constraints, views, triggers, routines, events and privileges.

    pool = SchemaPool(admin_url, build=init_schema_on_url)
    name = pool.acquire()        # a database name, its schema in place, no rows but the schema's
    ...
    pool.release(name)
    pool.close()                 # drops every database it made
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import pymysql
from sqlalchemy.engine import make_url

# What information_schema says of one database; ``{db}`` is its name (spelled out in view bodies).
_FINGERPRINT_QUERIES = (
    "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
    "SELECT TABLE_NAME, TABLE_TYPE, ENGINE, ROW_FORMAT, TABLE_COLLATION, CREATE_OPTIONS, TABLE_COMMENT"
    " FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME",
    "SELECT TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, COLUMN_DEFAULT, IS_NULLABLE, COLUMN_TYPE,"
    " CHARACTER_SET_NAME, COLLATION_NAME, COLUMN_KEY, EXTRA, GENERATION_EXPRESSION, COLUMN_COMMENT"
    " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, ORDINAL_POSITION",
    "SELECT TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME, NON_UNIQUE, SUB_PART, INDEX_TYPE, IGNORED"
    " FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
    "SELECT TABLE_NAME, CONSTRAINT_NAME, CONSTRAINT_TYPE FROM information_schema.TABLE_CONSTRAINTS"
    " WHERE CONSTRAINT_SCHEMA = %s ORDER BY TABLE_NAME, CONSTRAINT_NAME",
    "SELECT TABLE_NAME, CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS"
    " WHERE CONSTRAINT_SCHEMA = %s ORDER BY TABLE_NAME, CONSTRAINT_NAME",
    "SELECT TABLE_NAME, VIEW_DEFINITION, CHECK_OPTION, DEFINER, SECURITY_TYPE, ALGORITHM"
    " FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME",
    "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s",
    "SELECT ROUTINE_NAME, ROUTINE_TYPE FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s",
    "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s",
    "SELECT GRANTEE, PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES WHERE TABLE_SCHEMA = %s",
    "SELECT GRANTEE, TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES WHERE TABLE_SCHEMA = %s",
    "SELECT GRANTEE, TABLE_NAME, COLUMN_NAME, PRIVILEGE_TYPE FROM information_schema.COLUMN_PRIVILEGES"
    " WHERE TABLE_SCHEMA = %s",
)
_AUTO_INCREMENTS = (
    "SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
    " WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE' AND AUTO_INCREMENT IS NOT NULL"
)
LOCK_WAIT_SECONDS = 20  # a clean-up waiting on a lock this long gives the database up instead


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class _Built:
    """What a database looked like when built: its schema's fingerprint, rows and AUTO_INCREMENTs."""

    def __init__(
        self,
        fingerprint: Any,
        rows: dict[str, list[tuple]],
        columns: dict[str, list[str]],
        auto_increments: dict[str, int],
    ) -> None:
        self.fingerprint = fingerprint
        self.rows = rows
        self.columns = columns
        self.auto_increments = auto_increments


class SchemaPool:
    """Databases on one server that ``build(url)`` gave the schema, reused while their schema is intact."""

    def __init__(
        self,
        admin_url: str,
        build: Callable[[str], None],
        *,
        prefix: str | None = None,
        charset: str = "utf8mb4",
        collation: str = "utf8mb4_unicode_ci",
    ) -> None:
        self._url = make_url(admin_url)
        self._build = build
        self._prefix = prefix or f"cs_pool{os.getpid()}_"
        self._charset, self._collation = charset, collation
        self._numbers = itertools.count(1)
        self._free: list[str] = []
        self._made: set[str] = set()
        self._built: _Built | None = None
        self.stats = {"built": 0, "reused": 0, "dropped": 0}

    # --- the pool -----------------------------------------------------------------------------------

    def url_for(self, name: str) -> str:
        return self._url.set(database=name).render_as_string(hide_password=False)

    def acquire(self) -> str:
        """A database holding the schema as built, and no rows but those it was built with."""
        if self._free:
            self.stats["reused"] += 1
            return self._free.pop()
        name = f"{self._prefix}{next(self._numbers)}"
        with self._connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {_quote(name)} CHARACTER SET {self._charset} COLLATE {self._collation}")
        self._made.add(name)
        self._build(self.url_for(name))
        self.stats["built"] += 1
        if self._built is None:
            with self._connect() as conn, conn.cursor() as cur:
                self._built = self._describe(cur, name)
        return name

    def release(self, name: str) -> None:
        """Back to the pool, clean, if its schema is as built; else dropped."""
        try:
            with self._connect() as conn, conn.cursor() as cur:
                if self._clean(cur, name):
                    self._free.append(name)
                    return
        except pymysql.err.MySQLError:
            pass
        self._drop(name)

    def close(self) -> None:
        for name in list(self._made):
            self._drop(name)
        self._free.clear()

    # --- internals ----------------------------------------------------------------------------------

    def _connect(self) -> pymysql.connections.Connection:
        url = self._url
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=10,
            read_timeout=120,
            write_timeout=120,
        )

    def _fingerprint(self, cur: Any, name: str) -> tuple:
        out = []
        for query in _FINGERPRINT_QUERIES:
            cur.execute(query, (name,))
            # A view's body names its own database: compare it as if every database had one name.
            out.append(
                tuple(
                    tuple(v.replace(name, "{db}") if isinstance(v, str) else v for v in row) for row in cur.fetchall()
                )
            )
        return tuple(out)

    def _auto_increments(self, cur: Any, name: str) -> dict[str, int]:
        cur.execute(_AUTO_INCREMENTS, (name,))
        return {table: int(value) for table, value in cur.fetchall()}

    def _tables(self, cur: Any, name: str) -> list[str]:
        cur.execute(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
            " AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
            (name,),
        )
        return [t for (t,) in cur.fetchall()]

    def _rows(self, cur: Any, name: str, table: str) -> list[tuple]:
        cur.execute(f"SELECT * FROM {_quote(name)}.{_quote(table)} ORDER BY 1")
        return [tuple(r) for r in cur.fetchall()]

    def _describe(self, cur: Any, name: str) -> _Built:
        rows, columns = {}, {}
        for table in self._tables(cur, name):
            rows[table] = self._rows(cur, name, table)
            columns[table] = [d[0] for d in cur.description]
        return _Built(self._fingerprint(cur, name), rows, columns, self._auto_increments(cur, name))

    def _clean(self, cur: Any, name: str) -> bool:
        built = self._built
        assert built is not None
        # Whatever the test left connected to it (a pool not disposed, a daemon's session) goes first:
        # the next test must be the only one using the database.
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()", (name,))
        for (pid,) in cur.fetchall():
            try:
                cur.execute(f"KILL CONNECTION {int(pid)}")
            except pymysql.err.MySQLError:
                pass  # gone meanwhile
        if self._fingerprint(cur, name) != built.fingerprint:
            return False
        cur.execute(
            f"SET SESSION lock_wait_timeout = {LOCK_WAIT_SECONDS}, innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}"
        )
        db = _quote(name)
        for table, rows in built.rows.items():
            if not rows:
                cur.execute(f"DELETE FROM {db}.{_quote(table)}")
            elif self._rows(cur, name, table) != rows:
                cur.execute(f"DELETE FROM {db}.{_quote(table)}")
                cols = ", ".join(_quote(c) for c in built.columns[table])
                marks = ", ".join(["%s"] * len(built.columns[table]))
                cur.executemany(f"INSERT INTO {db}.{_quote(table)} ({cols}) VALUES ({marks})", rows)
        for table, value in self._auto_increments(cur, name).items():
            if value != built.auto_increments.get(table):
                cur.execute(f"ALTER TABLE {db}.{_quote(table)} AUTO_INCREMENT = {built.auto_increments.get(table, 1)}")
        # Rows left over would mean a lock we did not see or a table we do not know: give it up.
        return self._auto_increments(cur, name) == built.auto_increments and all(
            self._rows(cur, name, table) == rows for table, rows in built.rows.items() if rows
        )

    def _drop(self, name: str) -> None:
        if name in self._free:
            self._free.remove(name)
        try:
            with self._connect() as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()", (name,)
                )
                for (pid,) in cur.fetchall():
                    try:
                        cur.execute(f"KILL CONNECTION {int(pid)}")
                    except pymysql.err.MySQLError:
                        pass
                cur.execute(f"DROP DATABASE IF EXISTS {_quote(name)}")
        except pymysql.err.MySQLError:
            pass
        self._made.discard(name)
        self.stats["dropped"] += 1
