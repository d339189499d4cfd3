"""Attacks on the monitoring's database reading: what one snapshot costs on a table of finished rows."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event, text

from cancel_scanner.config import parse_config
from cancel_scanner.engine.clock import DbClock
from cancel_scanner.engine.runner import Runner
from cancel_scanner.monitoring.snapshot import take_snapshot
from cancel_scanner.scanners import REGISTRY

FINISHED_ORDERS = 4000
ORDER_COLUMNS = "order_no, user_id, merchant_id, goods_id, quantity, total_amount"


def _seed_finished(conn) -> None:
    """Paid orders never cancelled (close_unpaid never touches them: close 0/0) and cancelled, refunded ones."""
    for start in range(0, FINISHED_ORDERS, 1000):
        paid = ",".join(f"('P{n}', 1, 1, 1, 1, 100, 1, 'COMPLETED')" for n in range(start, start + 1000))
        conn.execute(text(f"INSERT INTO goods_order2 ({ORDER_COLUMNS}, pay_status, order_status) VALUES {paid}"))
        done = ",".join(
            f"('C{n}', 1, 1, 1, 1, 100, 1, 'CANCELLED', 'REFUNDED', 1, 1, 1, 1)" for n in range(start, start + 1000)
        )
        conn.execute(
            text(
                f"INSERT INTO goods_order2 ({ORDER_COLUMNS}, pay_status, order_status, refund_status,"
                f" stock_scanned, stock_success, sales_scanned, sales_success) VALUES {done}"
            )
        )
        refunds = ",".join(
            f"({n + 1}, 'R{n}', 'C{n}', 100, 100, 1, 1, 1, 1, 1, 1, 'SUCCESS')" for n in range(start, start + 1000)
        )
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, out_refund_no, out_trade_no, refund_amount, total_amount, submit_scanned,"
                f" submit_success, progress_scanned, progress_success, sync_scanned, sync_success, wx_status) VALUES {refunds}"
            )
        )


def default_runner(db):
    """The stages and a Runner over ``db`` with the default configuration (and no gateway): (stages, runner)."""
    config = parse_config({"database_url": str(db.url)}, REGISTRY, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"})
    stages = REGISTRY.build(config)
    return stages, Runner(db, config, stages, None)


@pytest.mark.mysql
def test_a_snapshot_reads_no_table_whole_and_counts_the_leases_this_process_holds(mysql_db):
    db = mysql_db
    stages, runner = default_runner(db)
    owner = runner.owner
    with db.begin() as conn:
        _seed_finished(conn)
        # Leased by this process: a requested cancel and a timed-out unpaid order (close_unpaid),
        # a refund being submitted; and one leased by another process.
        conn.execute(
            text(
                f"INSERT INTO goods_order2 ({ORDER_COLUMNS}, order_status, cancel_requested_at, close_lease_owner, created_at) VALUES"
                " ('U1', 1, 1, 1, 1, 100, 'UNPAID', UTC_TIMESTAMP(3), :me, UTC_TIMESTAMP(3) - INTERVAL 1 HOUR),"
                " ('U2', 1, 1, 1, 1, 100, 'UNPAID', NULL, :me, UTC_TIMESTAMP(3) - INTERVAL 1 HOUR),"
                " ('U3', 1, 1, 1, 1, 100, 'UNPAID', NULL, 'someone-else', UTC_TIMESTAMP(3) - INTERVAL 1 HOUR)"
            ),
            {"me": owner},
        )
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, out_refund_no, out_trade_no, refund_amount, total_amount, lease_owner)"
                " VALUES (99999, 'RL', 'U1', 100, 100, :me)"
            ),
            {"me": owner},
        )
        conn.execute(text("ANALYZE TABLE goods_order2, refund_order, req_order_ops"))

    sent: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        sent.append((statement, parameters))

    event.listen(db, "before_cursor_execute", capture)
    try:
        snap = take_snapshot(
            db,
            stages,
            DbClock(db)(),
            takeover_seconds=10,
            owner=owner,
            lease_columns=runner.lease_columns(),
            wall_now=time.time(),
        )
    finally:
        event.remove(db, "before_cursor_execute", capture)
    assert snap.leases_held == 3

    whole = []
    with db.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        for statement, parameters in sent:
            if not statement.lstrip().upper().startswith("SELECT") or "cancel_scanner_process" in statement:
                continue  # one row per running daemon: bounded
            cursor.execute("EXPLAIN " + statement, parameters)
            whole += [(row[2], row[3], statement) for row in cursor.fetchall() if row[3] in ("ALL", "index")]
    assert not whole, f"read whole: {whole}"


@pytest.mark.mysql
def test_stopping_the_watcher_does_not_wait_for_a_reading_stuck_on_the_database(mysql_db):
    """A DBA's ALTER or LOCK TABLES holds the watcher's SELECT: the daemon's exit must not wait for it."""
    from cancel_scanner.monitoring.watch import Watcher
    from testsupport.waiting import wait_until

    db = mysql_db
    stages, runner = default_runner(db)
    blocker = db.connect()
    blocker.exec_driver_sql("LOCK TABLES refund_order WRITE")
    watcher = Watcher(db, stages, runner, 15, takeover_seconds=10)
    try:
        watcher.start()
        with db.connect() as conn:
            wait_until(
                lambda: conn.exec_driver_sql(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE LIKE 'Waiting for table metadata lock'"
                ).scalar(),
                10,
                "the watcher's reading waiting for the lock",
            )
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 2.0
    finally:
        blocker.exec_driver_sql("UNLOCK TABLES")
        blocker.close()
        watcher._thread.join(10)


def test_a_stage_disabled_in_jobs_yaml_is_not_reported_up(sqlite_url):
    """cancel_scanner_stage_up is 1 while the stage runs: a stage this daemon never runs has no such series."""
    import urllib.request
    from contextlib import ExitStack

    from cancel_scanner.app import build_app, serve_monitoring
    from cancel_scanner.engine.daemon import Daemon
    from cancel_scanner.engine.db import init_schema, make_engine

    engine = make_engine(sqlite_url)
    init_schema(engine)
    engine.dispose()
    config = parse_config(
        {
            "database_url": sqlite_url,
            "monitoring": {"listen": "127.0.0.1:0"},
            "jobs": {"close_unpaid": {"enabled": False}},
        },
        REGISTRY,
        env={},
    )
    with ExitStack() as stack:
        app = build_app(config, stack)
        daemon = Daemon(app)
        server = serve_monitoring(app, daemon, stack)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    up = [line for line in body.splitlines() if line.startswith("cancel_scanner_stage_up{")]
    assert 'cancel_scanner_stage_up{stage="intake"} 1.0' in up
    assert not [line for line in up if '"close_unpaid"' in line], up
