"""The database a benchmark measures on: one throwaway MariaDB per script, a fresh database per measurement.

The server is ``testsupport.mariadb.MariaDBServer`` with its defaults, i.e. exactly as the
tests start it (``innodb_flush_log_at_trx_commit=2``, 256 MB buffer pool). Each
measurement gets its own database on it, so one measurement's rows and undo do not
slow the next (``wait_for_purge`` also waits for InnoDB's purge to catch up between them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pymysql
from sqlalchemy import Engine

from bench import reporting
from cancel_scanner.engine.db import init_schema, make_engine
from testsupport.mariadb import MariaDBServer
from testsupport.processes import DaemonProcess, process_cpu_seconds

PURGE_TIMEOUT_SECONDS = 180.0
PURGE_IDLE_HISTORY = 200  # undo log records left that we call "purged"


@dataclass
class Seeded:
    """A fresh database with its rows: its URL, an engine, a raw connection, what the seeding returned and
    how long it took."""

    url: str
    engine: Engine
    conn: pymysql.connections.Connection
    result: Any
    seconds: float


class Bench:
    """One throwaway MariaDB for a whole script; a fresh database per measurement."""

    def __init__(self, durable: bool = False, report: reporting.Report | None = None) -> None:
        # durable: fsync the redo log at every commit (production); default: as the tests run it
        self.server = MariaDBServer(fast=not durable)
        self._engines: list[Engine] = []
        self._report = report  # its machine is read once the server is up

    def __enter__(self) -> Bench:
        self.server.start()
        if self._report is not None:
            self._report.machine_before = reporting.machine(self.server)
        return self

    def __exit__(self, *exc: object) -> None:
        for engine in self._engines:
            engine.dispose()
        self.server.stop()
        self.server.cleanup()

    def database(self, name: str) -> tuple[str, Engine]:
        """A new, empty database with the schema of sql/schema.sql; its URL and an engine."""
        self.server.drop_database(name)
        url = self.server.create_database(name)
        engine = make_engine(url)
        init_schema(engine)
        self._engines.append(engine)
        return url, engine

    def seeded(
        self, name: str, seed: Callable[[pymysql.connections.Connection], Any], what: str, label: str = ""
    ) -> Seeded:
        """A new database ``name`` (as ``database``) and its raw connection, ``seed(conn)`` run on it; says
        what it seeds and how long that took, each line led by ``[label]`` if given."""
        url, engine = self.database(name)
        conn = self.connect(name)
        lead = f"[{label}] " if label else ""
        print(f"{lead}seeding {what}", flush=True)
        started = time.perf_counter()
        result = seed(conn)
        seconds = time.perf_counter() - started
        print(f"{lead}seeded in {seconds:.0f} s", flush=True)
        return Seeded(url, engine, conn, result, seconds)

    def small_and_big(
        self,
        prefix: str,
        sizes: tuple[int, int],
        seed: Callable[[pymysql.connections.Connection, int], Any],
        what: Callable[[int], str],
    ) -> dict[str, Seeded]:
        """Two databases, ``{prefix}_small`` and ``{prefix}_big``, seeded (as ``seeded``) with ``seed(conn, size)``
        for the two ``sizes``, the big one's undo log purged."""
        dbs = {
            label: self.seeded(f"{prefix}_{label}", lambda conn, size=size: seed(conn, size), what(size), label)
            for label, size in zip(("small", "big"), sizes, strict=True)
        }
        wait_for_purge(dbs["big"].conn)
        return dbs

    def drop(self, name: str) -> None:
        self.server.drop_database(name)

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        """A raw autocommit connection (seeding, ceilings, counters); UTC like the daemon's."""
        conn = self.server.connect(database, read_timeout=600, write_timeout=600)
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
        return conn


def sql(conn: pymysql.connections.Connection, statement: str, params: Any = None) -> list[tuple]:
    """Run one statement; its rows (none for a statement without a result)."""
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


def status_counters(conn: pymysql.connections.Connection, names: Iterable[str]) -> dict[str, int]:
    """The server's global status counters ``names`` (one SHOW GLOBAL STATUS, itself a Question)."""
    listed = ", ".join(f"'{name}'" for name in names)
    return {k: int(v) for k, v in sql(conn, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({listed})")}


@dataclass
class Stall:
    """A drain's watchdog: ``check`` raises once its count of done rows has not moved for ``seconds``
    (the run is broken, not slow)."""

    what: str
    n: int
    seconds: float
    last: int = -1  # the count last seen
    at: float = field(default_factory=time.monotonic)  # when it last moved

    def check(self, done: int, log_path: Any) -> None:
        if done != self.last:
            self.last, self.at = done, time.monotonic()
        elif time.monotonic() - self.at > self.seconds:
            raise RuntimeError(f"{self.what}: no progress for {self.seconds:.0f} s at {done}/{self.n}; see {log_path}")


@dataclass
class Spent:
    """What a daemon and the server spent over a window, per minute: the status counters (Questions less
    our own SHOW GLOBAL STATUS) and the CPU seconds of each process."""

    seconds: float  # the window, as measured
    per_minute: dict[str, float]
    daemon_cpu: float
    server_cpu: float


def spent_while(
    conn: pymysql.connections.Connection,
    counters: Sequence[str],
    daemon: DaemonProcess,
    server: MariaDBServer,
    seconds: float,
) -> Spent:
    """Sleeps ``seconds`` and returns what ``daemon`` and ``server`` spent meanwhile (counters read on ``conn``)."""

    def reading() -> tuple[dict[str, int], float, float, float]:
        return status_counters(conn, counters), daemon.cpu_seconds(), process_cpu_seconds(server.pid), time.monotonic()

    before, cpu_d, cpu_s, t0 = reading()
    time.sleep(seconds)
    after, cpu_d1, cpu_s1, t1 = reading()
    per_minute = 60.0 / (t1 - t0)
    delta = {k: (after[k] - before[k]) * per_minute for k in counters}
    delta["Questions"] -= 1 * per_minute  # our own SHOW GLOBAL STATUS
    return Spent(t1 - t0, delta, (cpu_d1 - cpu_d) * per_minute, (cpu_s1 - cpu_s) * per_minute)


def explain(conn: pymysql.connections.Connection, statement: str, params: Any) -> tuple[list[dict], list[dict]]:
    """EXPLAIN's and ANALYZE's rows of one statement, each row a dict by column name."""

    def rows(cur: Any) -> list[dict]:
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    with conn.cursor() as cur:
        cur.execute("EXPLAIN " + statement, params)
        plan = rows(cur)
        cur.execute("ANALYZE " + statement, params)
        analyzed = rows(cur)
    return plan, analyzed


PLAN_COLUMNS = ("type", "key", "rows (estimate)", "rows read (ANALYZE)", "Extra")


def plan_cells(plan: list[dict], analyzed: list[dict]) -> list[str]:
    """What ``explain`` found, one cell per PLAN_COLUMNS, each naming the statement's tables in turn."""
    return [
        " ".join(str(r["type"]) for r in plan),
        " ".join(str(r["key"]) for r in plan),
        " ".join(str(r["rows"]) for r in plan),
        " ".join(str(r.get("r_rows")) for r in analyzed),
        " ".join(str(r["Extra"] or "") for r in plan),
    ]


def scalar(conn: pymysql.connections.Connection, statement: str, params: Any = None) -> Any:
    """The first column of the first row, or None."""
    rows = sql(conn, statement, params)
    return rows[0][0] if rows else None


def status_counter(conn: pymysql.connections.Connection, name: str) -> int:
    """One of the server's global status counters."""
    return int(sql(conn, "SHOW GLOBAL STATUS LIKE %s", (name,))[0][1])


def wait_for_purge(conn: pymysql.connections.Connection, timeout: float = PURGE_TIMEOUT_SECONDS) -> float:
    """Wait until InnoDB purged the undo of earlier writes, so it does not run during the next measurement."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if status_counter(conn, "Innodb_history_list_length") <= PURGE_IDLE_HISTORY:
            break
        time.sleep(0.5)
    return time.monotonic() - started
