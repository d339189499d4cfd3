"""Database engines and schema creation, for SQLite and MySQL/MariaDB.

The session settings here are load-bearing: UTC on every connection (the
scanner stores and compares UTC times), strict SQL mode (so an UNSIGNED column
errors instead of silently clamping to 0), READ COMMITTED (fewer gap locks
between concurrent claimers) and a short lock wait (a locked row is skipped
and retried later rather than stalling a whole batch). On a Galera node,
`wsrep_sync_wait` as configured, so that what we read includes every write the
cluster committed before (ours included, whichever node took it); and a Galera
node without a binary log is refused (UnsafeGaleraNode).
"""

from __future__ import annotations

import pymysql
from sqlalchemy import Engine, create_engine, event, inspect, text

from cancel_scanner import models
from cancel_scanner.engine.config import DEFAULT_WSREP_SYNC_WAIT
from cancel_scanner.engine.schema_file import head_version, schema_sql, split_sql

LOCK_WAIT_TIMEOUT_SECONDS = 5
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MYSQL_INIT = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', "
    f"innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_SECONDS}"
)


UNSAFE_NODE_CODE = 1290  # MariaDB's "running with an option that prevents this statement": an environment error


class UnsafeGaleraNode(pymysql.err.OperationalError):
    """A Galera node running without a binary log (log_bin OFF, MariaDB's "binlog emulation").

    On such a node ROLLBACK TO SAVEPOINT after an earlier statement of the transaction still
    replicates the rolled-back rows to the other nodes (reproduced on 10.11.19; docs/concurrency.md),
    and every batch of ours may roll back to a savepoint (goods the shop holds, a row a trigger
    refuses). So no connection to it is used: raised while connecting, it reaches the caller as the
    database's own "running with an option" error (1290), which the engine treats as its environment
    (the stage waits, nothing is written) and the CLI reports in one line.
    """

    def __init__(self, host: str) -> None:
        super().__init__(
            UNSAFE_NODE_CODE,
            f"Galera node {host} runs without a binary log (log_bin OFF): rolled-back savepoints would "
            "replicate; start every node with log_bin (docs/concurrency.md)",
        )


def is_mysql(engine: Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def make_engine(
    url: str, *, pool_size: int = 8, echo: bool = False, wsrep_sync_wait: int = DEFAULT_WSREP_SYNC_WAIT
) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_pre_ping=True,  # a database that went away and came back costs one failed ping, not a crash
        pool_recycle=3600,
        pool_size=pool_size,
        max_overflow=pool_size,
        isolation_level="READ COMMITTED",
        connect_args={"init_command": _MYSQL_INIT, "connect_timeout": 5, "read_timeout": 60, "write_timeout": 60},
    )
    _configure_galera(engine, wsrep_sync_wait)
    return engine


def engine_for(config) -> Engine:
    """The engine a Config names, with its Galera setting."""
    return make_engine(config.database_url, wsrep_sync_wait=config.wsrep_sync_wait)


def _configure_galera(engine: Engine, sync_wait: int) -> None:
    if not 0 <= sync_wait <= 15:
        raise ValueError(f"wsrep_sync_wait must be 0..15: {sync_wait!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, record):
        # Asked once per connection.
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SHOW VARIABLES WHERE Variable_name IN ('wsrep_on', 'log_bin', 'hostname', 'port')")
            seen = {str(name).lower(): str(value) for name, value in cur.fetchall()}  # no wsrep_on on MySQL
            on = seen.get("wsrep_on", "").upper() == "ON"
            record.info["galera"] = on
            if on and seen.get("log_bin", "").upper() != "ON":
                raise UnsafeGaleraNode(f"{seen.get('hostname', '?')}:{seen.get('port', '?')}")
            if on:
                cur.execute(f"SET SESSION wsrep_sync_wait = {int(sync_wait)}")
        finally:
            cur.close()


def is_galera(engine: Engine) -> bool:
    """Whether the engine's connections go to a Galera node (wsrep_on); False for SQLite and plain servers."""
    if not is_mysql(engine):
        return False
    with engine.connect() as conn:
        return bool(conn.connection.info.get("galera"))


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transactions into our own hands: pysqlite's implicit BEGIN is deferred, which
        # lets two writers both read and then fail on upgrade. BEGIN IMMEDIATE takes the
        # single write lock up front, so a claim is a claim.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def init_schema(engine: Engine) -> list[str]:
    """Create the tables on a fresh database (idempotent) and record the schema version.

    MySQL runs sql/schema.sql (its last statement records the version); SQLite builds from the
    models and records the same version. An existing database is `cancel-scanner migrate`'s.
    """
    if is_mysql(engine):
        with engine.begin() as conn:
            for stmt in split_sql(schema_sql()):
                conn.exec_driver_sql(stmt)
    else:
        models.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                models.schema_version.insert().prefix_with("OR IGNORE"),
                {"version": head_version(), "applied_by": "initdb"},
            )
    return sorted(inspect(engine).get_table_names())


def check_connection(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
