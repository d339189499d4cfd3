"""`status` from another process: which stages are down on the running daemons, since when and
why, and the rows they finished, read from their heartbeats instead of counting finished rows.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pymysql
from sqlalchemy import event, insert
from sqlalchemy.exc import OperationalError

from cancel_scanner.config import parse_config
from cancel_scanner.engine.clock import DbClock
from cancel_scanner.engine.daemon import Daemon
from cancel_scanner.engine.runner import Runner
from cancel_scanner.engine.status import collect_status, format_status
from cancel_scanner.scanners import REGISTRY
from tests.flow import drop_index
from tests.integration.test_throwaway_stage import TidyUp, chores
from testsupport.waiting import wait_until

LOST = OperationalError(
    "SELECT 1", {}, pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
)


class Fickle(TidyUp):
    """TidyUp whose database goes away while ``broken`` is set: the daemon backs the stage off."""

    broken = threading.Event()

    def process(self, conn, rows, now):
        if self.broken.is_set():
            raise LOST
        return super().process(conn, rows, now)


def tidy(status):
    return next(s for s in status.stages if s.stage == "tidy_up")


def test_status_says_which_stage_is_down_where_and_why_and_counts_what_daemons_finished(db, db_url):
    chores.metadata.create_all(db)
    with db.begin() as conn:
        conn.execute(insert(chores), [{"payload": "dishes"} for _ in range(5)])
    registry = REGISTRY.with_stage(Fickle)
    jobs = {name: {"enabled": False} for name in REGISTRY.names}
    config = parse_config(
        {
            "database_url": db_url,
            "heartbeat_seconds": 0.2,
            "jobs": {**jobs, "tidy_up": {"interval_seconds": 0.05, "batch_size": 2}},
        },
        registry,
        env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"},
    )
    stages = registry.build(config)
    runner = Runner(db, config, stages, None)
    daemon = Daemon(SimpleNamespace(runner=runner, config=config))
    assert "no cancel-scanner daemon is running" in format_status(collect_status(db, stages, runner.clock()))

    Fickle.broken.set()
    daemon.start()
    try:
        down = wait_until(
            lambda: collect_status(db, stages, runner.clock()),
            20,
            "tidy_up reported down",
            until=lambda s: tidy(s).down,
            interval=0.05,
        )
        (where,) = tidy(down).down
        assert where.reason == "OperationalError 2013: Lost connection to MySQL server during query"
        assert tidy(down).up is False and where.daemon.endswith(f":{os.getpid()}")
        line = next(line for line in format_status(down).splitlines() if line.startswith("tidy_up"))
        assert "DOWN for" in line and "Lost connection" in line
        assert down.as_dict()["stages"]["tidy_up"]["up"] is False
        assert down.as_dict()["stages"]["intake"]["up"] is None  # no running daemon runs it

        Fickle.broken.clear()
        up = wait_until(
            lambda: collect_status(db, stages, runner.clock()),
            30,
            "tidy_up up again with its 5 rows done",
            until=lambda s: tidy(s).up and tidy(s).done_by_daemons == 5,
            interval=0.05,
        )
        assert tidy(up).pending == 0 and tidy(up).daemons == 1
        assert "tidy_up" in format_status(up) and "DOWN" not in format_status(up)
    finally:
        Fickle.broken.clear()
        daemon.runner.stop()
        assert daemon.shutdown()
        runner.close()
    assert collect_status(db, stages, runner.clock()).daemons == ()  # a clean stop leaves the registry


def test_status_reads_no_finished_row_unless_asked_for_totals(db):
    """The finished rows grow without bound; only `status --totals` may count them (one more count per stage)."""
    statements: list[tuple[str, object]] = []

    def seen(_conn, _cursor, statement, parameters, *_args):
        statements.append((" ".join(statement.split()).lower(), parameters))

    stages = REGISTRY.build(parse_config({}, REGISTRY, env={}))
    now = DbClock(db)()
    event.listen(db, "before_cursor_execute", seen)
    try:
        collect_status(db, stages, now)
        cheap = list(statements)
        statements.clear()
        collect_status(db, stages, now, totals=True)
        full = list(statements)
    finally:
        event.remove(db, "before_cursor_execute", seen)
    extra = [sql for sql in full if sql not in cheap]
    assert len(full) == len(cheap) + len(stages) and len(extra) == len(stages)
    assert all(sql[0].startswith("select count(*)") for sql in extra)


def test_how_long_a_stage_is_down_does_not_depend_on_either_hosts_clock(db):
    """A daemon whose clock is an hour off reports a stage down for 30 s; its last heartbeat is 2 s old
    by the database's clock: status says 32 s, whatever the clock of the host running status."""
    from datetime import timedelta

    from cancel_scanner.engine.progress import Progress
    from cancel_scanner.models import scanner_process

    skewed = {"t": 1_800_000_000.0 + 3_600}
    progress = Progress(["intake"], wall=lambda: skewed["t"])
    progress.stage_down("intake", "OperationalError 2006: MySQL server has gone away")
    skewed["t"] += 30
    now = DbClock(db)()
    with db.begin() as conn:
        conn.execute(
            insert(scanner_process).values(
                owner="far:1:x",
                hostname="far",
                pid=1,
                started_at=now,
                heartbeat_at=now - timedelta(seconds=2),
                report=progress.report(),
            )
        )
    stages = REGISTRY.build(parse_config({}, REGISTRY, env={}))
    (down,) = next(s for s in collect_status(db, stages, now).stages if s.stage == "intake").down
    assert (down.daemon, round(down.seconds), down.reason) == (
        "far:1",
        32,
        "OperationalError 2006: MySQL server has gone away",
    )


def test_a_version_2_database_migrates_to_published_reports_and_an_older_daemons_entry_still_reads(db):
    """Schema version 3 brought cancel_scanner_process.report and the close-lease index: a database at
    version 2 is brought there by migrate; the entry of a daemon that wrote no report reads as
    running nothing we can tell, never as a crash."""
    from cancel_scanner.app import migration_plan, schema_problem
    from cancel_scanner.engine import migrate
    from cancel_scanner.models import scanner_process

    now = DbClock(db)()
    with db.begin() as conn:
        conn.exec_driver_sql("DROP VIEW IF EXISTS v_cancel_scanner_failed")
        drop_index(conn, "goods_order2", "idx_goods_order2_close_lease_owner")
        conn.exec_driver_sql("ALTER TABLE cancel_scanner_process DROP COLUMN report")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (2, 'test')")
        conn.exec_driver_sql(
            "INSERT INTO cancel_scanner_process (owner, hostname, pid, started_at, heartbeat_at) VALUES ('old:7:x', 'old', 7, ?, ?)"
            if db.dialect.name == "sqlite"
            else "INSERT INTO cancel_scanner_process (owner, hostname, pid, started_at, heartbeat_at) VALUES ('old:7:x', 'old', 7, %s, %s)",
            (now, now),
        )
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (2, migrate.head_version())
    migrate.apply(db, the_plan)
    assert schema_problem(db) is None and migration_plan(db).steps == []
    with db.connect() as conn:
        assert conn.execute(scanner_process.select()).one().report is None
    stages = REGISTRY.build(parse_config({}, REGISTRY, env={}))
    status = collect_status(db, stages, DbClock(db)())
    assert status.daemons == ("old:7",) and all(s.daemons == 0 and s.up is None for s in status.stages)
