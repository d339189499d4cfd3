"""Every time the engine compares is the database's: a daemon's own wall clock cannot move a lease.

MariaDB lets a session pretend another time (`SET timestamp`): the daemon below runs against a
server whose clock says 2026-11-01 12:00 while this host says otherwise, and every time it writes
is the server's. SQLite lives in the daemon's own process, so there the two are one clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import event

from cancel_scanner.engine.clock import ClockWatch, DbClock, local_utcnow
from cancel_scanner.engine.db import init_schema, make_engine
from cancel_scanner.engine.runner import Runner
from cancel_scanner.scanners import build_stages
from tests.flow import add_goods, add_order, refunds, request_cancel, test_config

SERVER_TIME = datetime(2026, 11, 1, 12, 0, 0)


@pytest.mark.mysql
def test_leases_and_due_times_are_written_on_the_database_clock_not_this_hosts(mysql_url, sandbox):
    db = make_engine(mysql_url)
    epoch = (SERVER_TIME - datetime(1970, 1, 1)).total_seconds()

    @event.listens_for(db, "connect")
    def server_says_another_time(dbapi_conn, _record):
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET timestamp = {epoch:.0f}")

    init_schema(db)
    add_goods(db, 1)
    add_order(db, 901)
    request_cancel(db, 901)
    config = test_config(mysql_url)
    runner = Runner(db, config, build_stages(config), sandbox.gateway)  # no clock given: the database's
    seen = []
    runner.hooks.after_lease = lambda stage, ids: seen.append(refunds(db)[901]["lease_until"])
    try:
        assert abs((DbClock(db)() - SERVER_TIME).total_seconds()) < 5
        assert abs((local_utcnow() - SERVER_TIME).total_seconds()) > 3600  # this host is elsewhere in time
        runner.run_stage("intake")
        runner.run_stage("submit_refund")
    finally:
        runner.close()
        db.dispose()

    lease = config.job("submit_refund").lease_seconds
    assert abs((seen[0] - (SERVER_TIME + timedelta(seconds=lease))).total_seconds()) < 5
    refund = refunds(make_engine(mysql_url))[901]
    assert refund["submit_success"] == 1
    first_poll = config.job("poll_refund").poll_delays_seconds[0]
    assert abs((refund["next_attempt_at"] - (SERVER_TIME + timedelta(seconds=first_poll))).total_seconds()) < 5


def test_the_sqlite_clock_is_the_hosts_own(sqlite_url):
    db = make_engine(sqlite_url)
    init_schema(db)
    assert abs((DbClock(db)() - local_utcnow()).total_seconds()) < 2
    assert abs(DbClock(db).offset_seconds()) < 2
    db.dispose()


def test_the_clock_watch_says_it_once_per_change_and_loudly_near_wechats_limit():
    from loguru import logger

    said: list[tuple[str, float]] = []
    sink = logger.add(
        lambda m: said.append((m.record["level"].name, m.record["extra"].get("offset_seconds"))),
        filter=lambda r: r["extra"].get("action") == "clock_offset",
    )
    offsets = iter([0.1, 3.0, 3.5, 280.0, 600.0, -0.5])
    watch = ClockWatch(lambda: next(offsets))
    try:
        for _ in range(6):
            watch.check()
    finally:
        logger.remove(sink)
    assert said == [("WARNING", 3.0), ("ERROR", 280.0), ("INFO", -0.5)]
