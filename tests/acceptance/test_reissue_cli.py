"""CLOSED -> `cancel-scanner reissue` -> SUCCESS, through the CLI in a subprocess, beside a running
live-mode daemon on MariaDB (issue 15)."""

from __future__ import annotations

import pytest

from tests.acceptance import harness
from tests.flow import REISSUED_REFUND_EVENTS
from testsupport import processes
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql
N = 4


def test_a_closed_refund_reissued_from_the_cli_is_refunded_once_and_a_second_reissue_is_refused(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    orders = harness.paid_orders(mysql_db, emu, N)
    closed = orders[0]
    emu.emulator.close_refunds_for(closed["no"])
    daemon, config = harness.settled_daemon(tmp_path, mysql_db, mysql_url, emu, orders, daemons)
    order_sql = f"SELECT refund_status FROM goods_order2 WHERE id = {closed['id']}"
    assert harness.q_scalar(mysql_db, order_sql) == "FAILED"
    # The rule has closed the first refund; lifted before the reissue, or the running daemon may
    # submit and poll the new refund before the test lifts it, and WeChat closes that one too.
    emu.emulator.clear_rules()

    too_early = processes.run_cli(
        ["reissue", str(closed["id"]), str(orders[1]["id"])], config=config, env=emu.env(), cwd=tmp_path
    )
    assert too_early.returncode == 2  # the second order was refunded: refused, and said so on one line
    assert f"order {orders[1]['id']}: refused NOT_CLOSED" in too_early.stderr
    assert f"order {closed['id']}: reissued as CSR{closed['id']}-2" in too_early.stdout

    wait_until(
        lambda: harness.q_scalar(mysql_db, order_sql),
        60,
        "the reissued refund to succeed",
        until=lambda s: s == "REFUNDED",
        daemons=[daemon],
    )
    harness.wait_settled(mysql_db, 60, [daemon])
    assert emu.emulator.refunds_created[f"CSR{closed['id']}-1"] == 1
    assert emu.emulator.refunds_created[f"CSR{closed['id']}-2"] == 1
    assert {no: n for no, n in emu.emulator.refunds_created.items() if n != 1} == {}
    again = processes.run_cli(["reissue", str(closed["id"]), "--by", "ops"], config=config, env=emu.env(), cwd=tmp_path)
    assert again.returncode == 2 and "refused NOT_CLOSED" in again.stderr
    assert harness.q_scalar(mysql_db, f"SELECT COUNT(*) FROM refund_order WHERE order_id = {closed['id']}") == 2
    events = [
        r["event"]
        for r in harness.q_rows(
            mysql_db, f"SELECT event FROM goods_order2_oplog WHERE order_id = {closed['id']} ORDER BY id"
        )
    ]
    # Stock and sales move in parallel stages, so their two events may come in either order.
    assert events[:6] == list(REISSUED_REFUND_EVENTS)
    assert sorted(events[6:]) == ["SALES_DECREMENTED", "STOCK_RESTORED"]
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
