"""Every row the status page lists as needing a person has its reason, on SQLite too (issue 24, item 4).

A refund WeChat CLOSED is poll_refund's 1/0; sync_result clears its last_error when it writes the
result to the order, so the page read an empty reason on SQLite (MariaDB's view had its own words).
"""

from __future__ import annotations

from cancel_scanner.monitoring.snapshot import listings
from cancel_scanner.scanners import build_stages
from tests.flow import add_goods, add_order, request_cancel
from testsupport import shop


def test_a_closed_refund_on_the_page_says_why_it_needs_a_person(world):
    add_goods(world.db, 1)
    add_order(world.db, 31)
    world.emulator.close_refunds_for(shop.order_row(31)["no"])
    request_cancel(world.db, 31)
    world.settle()
    with world.db.connect() as conn:
        found = {item.key: item for item in listings(conn, build_stages(world.config))}
    rows = found["failed:poll_refund"].rows
    assert len(rows) == 1 and rows[0]["last_error"] == "REFUND_CLOSED: WeChat closed refund CSR31-1; no money moved"


def test_the_first_readings_come_soon_until_they_list_the_daemon_serving_them(db, db_url, sandbox):
    """Issue 24, item 4: the first snapshot, taken before the daemon's first heartbeat, said "running
    daemons: none" on the daemon serving the page, for up to refresh_seconds."""
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.monitoring.watch import Watcher
    from tests.flow import Clock, test_config
    from testsupport.waiting import wait_until

    config = test_config(db_url)
    runner = Runner(db, config, build_stages(config), sandbox.gateway, clock=Clock())
    watcher = Watcher(db, dict(runner.stages), runner, 600, takeover_seconds=config.takeover_seconds).start()
    try:
        wait_until(lambda: watcher.latest, 10, "the first reading")
        assert runner.owner not in watcher.latest.status.owners  # read before the first heartbeat
        runner.registry.beat()
        wait_until(lambda: runner.owner in watcher.latest.status.owners, 10, "a reading that lists this daemon")
    finally:
        watcher.stop()
        runner.registry.deregister()
        runner.close()
