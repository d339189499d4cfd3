"""A new stage needs its module and one registry line: nothing else spells its name.

A throwaway stage on a table of its own is declared here, added to the registry, and run through
the real daemon (in-process, on APScheduler), `status` and `requeue`, on SQLite and MariaDB.
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    func,
    insert,
    or_,
    select,
)

from cancel_scanner.config import parse_config
from cancel_scanner.engine.daemon import Daemon
from cancel_scanner.engine.outcome import Done, Failed
from cancel_scanner.engine.requeue import requeue
from cancel_scanner.engine.runner import Runner
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.engine.status import collect_status, format_status
from cancel_scanner.scanners import REGISTRY
from testsupport.waiting import wait_until

chores = Table(
    "throwaway_chores",
    MetaData(),
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("payload", String(32), nullable=False),
    Column("tidy_scanned", SmallInteger, nullable=False, server_default="0"),
    Column("tidy_success", SmallInteger, nullable=False, server_default="0"),
    Column("tidy_attempts", Integer, nullable=False, server_default="0"),
    Column("tidy_next_attempt_at", DateTime),
    Column("tidy_last_error", String(255)),
    Column("created_at", DateTime, nullable=False, server_default=func.now()),
)
c = chores.c


class TidyUp(StageDefaults):
    """Ready: not tidied yet. Does: nothing but judge the payload. Flips: tidy 1/1, or 1/0 for "mess"."""

    name = "tidy_up"
    flags = Flags(
        table=chores,
        scanned=c.tidy_scanned,
        success=c.tidy_success,
        attempts=c.tidy_attempts,
        next_attempt_at=c.tidy_next_attempt_at,
        last_error=c.tidy_last_error,
    )
    pending_since = c.created_at
    failed_note = "chore(s) found too messy (throwaway_chores.tidy_last_error)"

    def pending(self):
        return [c.tidy_scanned == 0, c.tidy_success == 0]

    def ready(self, now: datetime, limit: int):
        due = or_(c.tidy_next_attempt_at.is_(None), c.tidy_next_attempt_at <= now)
        return select(chores).where(*self.pending(), due).order_by(c.id).limit(limit)

    def process(self, conn, rows, now):
        return {r.id: Failed("TOO_MESSY", "this one needs a person") if r.payload == "mess" else Done() for r in rows}


def test_a_throwaway_stage_runs_through_the_daemon_status_and_requeue(db, db_url):
    chores.metadata.create_all(db)
    with db.begin() as conn:
        conn.execute(insert(chores), [{"payload": "mess" if i == 3 else "dishes"} for i in range(1, 11)])
    registry = REGISTRY.with_stage(TidyUp)
    jobs = {name: {"enabled": False} for name in REGISTRY.names}
    config = parse_config(
        {"database_url": db_url, "jobs": {**jobs, "tidy_up": {"interval_seconds": 0.05, "batch_size": 4}}},
        registry,
        env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"},
    )
    stages = registry.build(config)
    runner = Runner(db, config, stages, None)
    daemon = Daemon(SimpleNamespace(runner=runner, config=config))

    def counts():
        with db.connect() as conn:
            return dict(
                conn.execute(
                    select(c.tidy_success, func.count()).where(c.tidy_scanned == 1).group_by(c.tidy_success)
                ).all()
            )

    daemon.start()
    try:
        assert wait_until(counts, 20, "9 chores tidied, 1 too messy", until=lambda n: n == {1: 9, 0: 1}, interval=0.02)
        status = collect_status(db, stages, runner.clock(), totals=True)
        tidy = next(s for s in status.stages if s.stage == "tidy_up")
        assert (tidy.pending, tidy.failed, tidy.done) == (0, 1, 9)
        assert "tidy_up failed = 1 chore(s) found too messy" in format_status(status)

        with db.connect() as conn:
            mess = conn.execute(select(c.id).where(c.payload == "mess")).scalar_one()
            conn.execute(chores.update().where(c.id == mess).values(payload="dishes"))
            conn.commit()
        assert requeue(db, stages["tidy_up"], [mess], runner.clock(), "ops-anna") == 1
        assert wait_until(counts, 20, "all 10 chores tidied", until=lambda n: n == {1: 10}, interval=0.02)
    finally:
        daemon.runner.stop()
        assert daemon.shutdown()
        runner.close()
