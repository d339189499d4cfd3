"""`cancel-scanner reconcile` through the CLI in a subprocess, against the emulator's bill, on MariaDB."""

from __future__ import annotations

from datetime import datetime

import pytest

from cancel_scanner.operations.reconcile import BEIJING
from tests.acceptance import harness
from testsupport import processes

pytestmark = pytest.mark.mysql
N = 3


def test_reconcile_says_clean_then_differences_then_not_ready_with_its_exit_codes(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    emu.emulator.bill_ready_after = None  # today's bill at once (the daemon refunds on today's clock)
    orders = harness.paid_orders(mysql_db, emu, N)
    daemon, config = harness.settled_daemon(tmp_path, mysql_db, mysql_url, emu, orders, daemons)
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    today = str(datetime.now(BEIJING).date())

    def reconcile():
        return processes.run_cli(["reconcile", "--date", today], config=config, env=emu.env(), cwd=tmp_path)

    clean = reconcile()
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert f"{today}: CLEAN, {2 * N} bill row(s), 0 difference(s)" in clean.stdout

    with mysql_db.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE refund_order SET refund_amount = refund_amount - 1 WHERE order_id = {orders[0]['id']}"
        )
    differs = reconcile()
    assert differs.returncode == 4 and "AMOUNT_DIFFERS: 1" in differs.stdout, differs.stdout
    assert harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM reconcile_diff") == 1
    status = harness.status_json(config, emu.env(), tmp_path)
    assert status["reconcile"] == {"bill_date": today, "state": "DIFFERS", "diffs": 1, "last_error": None}

    emu.emulator.statement_creating(datetime.now(BEIJING).date())
    waiting = reconcile()
    assert waiting.returncode == 75 and "not ready yet" in waiting.stderr
    assert harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM reconcile_diff") == 1  # a day not read keeps its rows

    sandbox = processes.write_config(tmp_path / "sandbox.yaml", {"database_url": mysql_url})
    refused = processes.run_cli(["reconcile"], config=sandbox, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}, cwd=tmp_path)
    assert refused.returncode == 2 and "wechat.mode is sandbox" in refused.stderr


def test_a_bill_with_a_line_twice_and_a_payment_unpaid_here_differs_and_one_that_does_not_add_up_fails(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    """Issue 23, item 4, through the CLI against the emulator's own bill."""
    from testsupport import shop

    emu = external_emulators(tmp_path / "keys")
    emu.emulator.bill_ready_after = None
    orders = harness.paid_orders(mysql_db, emu, N)
    daemon, config = harness.settled_daemon(tmp_path, mysql_db, mysql_url, emu, orders, daemons)
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    unpaid = shop.order_row(9, paid=False)
    shop.insert_orders(mysql_db, [unpaid])
    emu.emulator.create_trade(unpaid["no"], unpaid["amount"])
    emu.emulator.user_pays(unpaid["no"])  # the shop is never told
    today = str(datetime.now(BEIJING).date())

    def reconcile():
        return processes.run_cli(["reconcile", "--date", today], config=config, env=emu.env(), cwd=tmp_path)

    emu.emulator.duplicate_refund_line = "summary_too"
    differs = reconcile()
    assert differs.returncode == 4, differs.stdout + differs.stderr[-2000:]
    assert "DUPLICATE_LINE: 1" in differs.stdout and "UNBOOKED_PAYMENT: 1" in differs.stdout, differs.stdout
    kinds = [r["kind"] for r in harness.q_rows(mysql_db, "SELECT kind FROM reconcile_diff ORDER BY kind")]
    assert kinds == ["DUPLICATE_LINE", "UNBOOKED_PAYMENT"]
    handed = harness.q_rows(mysql_db, "SELECT close_scanned, close_last_error FROM goods_order2 WHERE id = 9")[0]
    assert handed["close_scanned"] == 0 and handed["close_last_error"].startswith("UNBOOKED_PAYMENT")

    emu.emulator.duplicate_refund_line = "line_only"
    failed = reconcile()
    assert failed.returncode == 1 and "BILL_TOTALS_DIFFER" in failed.stderr, failed.stdout + failed.stderr[-2000:]
    run = harness.q_rows(mysql_db, f"SELECT state, last_error FROM reconcile_run WHERE bill_date = '{today}'")[0]
    assert run["state"] == "FAILED" and "its summary counts" in run["last_error"]
