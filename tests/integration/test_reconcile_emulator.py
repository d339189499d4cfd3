"""Reconciliation over a day of the emulator's own trades, its bill downloaded over HTTP with real
signatures (gzip, SHA1, BOM, backticks): a clean day finds nothing; then one difference of each
kind planted at WeChat's end or ours, each found once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cancel_scanner.gateway.contract import RefundRequest
from cancel_scanner.operations.bill import fetch_bill
from cancel_scanner.operations.reconcile import BEIJING, reconcile_day
from tests.flow import add_goods, add_order, request_cancel, row, rows, scalar
from tests.integration.test_reconcile import an_order_cancelled_unpaid_whose_user_paid_anyway


@pytest.fixture
def today(world):
    """The flow on today's clock (the emulator dates its trades by the real one); bills ready at once."""
    world.clock.now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    world.emulator.bill_ready_after = None
    return datetime.now(BEIJING).date()


def refunded(world, n: int) -> None:
    add_goods(world.db, 1, stock=100, sales=50)
    for i in range(1, n + 1):
        add_order(world.db, i)
        world.emulator.register_payment(f"SO{i:010d}", 1280, f"42000000{i:05d}")
        request_cancel(world.db, i)
    world.settle()


def kinds(world) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for d in rows(world.db, "SELECT kind, out_trade_no FROM reconcile_diff ORDER BY id"):
        found.setdefault(d["kind"], []).append(d["out_trade_no"])
    return found


def test_a_day_of_the_emulators_trades_reconciles_clean_then_every_planted_difference_is_found(world, today):
    refunded(world, 6)
    fetch = lambda day: fetch_bill(world.sandbox.gateway, day)  # noqa: E731

    clean = reconcile_day(world.db, fetch, today, now=world.clock.now)
    assert (clean.state, clean.diffs, clean.bill_rows) == ("CLEAN", (), 12), clean

    # WeChat's end: a refund made by hand on the merchant platform; a payment for an order cancelled here.
    world.emulator.register_payment("SO0000000099", 500, "4200000000099")
    assert (
        world.sandbox.gateway.apply(RefundRequest("MANUAL-99", "SO0000000099", 500, 500)).__class__.__name__
        == "Accepted"
    )
    an_order_cancelled_unpaid_whose_user_paid_anyway(world, 7)
    world.emulator.create_trade("SO0000000007", 1280)
    assert world.emulator.user_pays("SO0000000007")
    # Ours: an amount and a final state written wrong, and a refund renumbered: WeChat never saw CSR2-9 and
    # has a CSR2-1 we no longer know.
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE refund_order SET refund_amount = 1279 WHERE out_refund_no = 'CSR3-1'")
        conn.exec_driver_sql(
            "UPDATE refund_order SET wx_status = 'CLOSED', progress_success = 0 WHERE out_refund_no = 'CSR4-1'"
        )
        conn.exec_driver_sql("UPDATE refund_order SET out_refund_no = 'CSR2-9' WHERE out_refund_no = 'CSR2-1'")
    world.emulator.forget_bills()  # the bill is made again, from what it recorded since

    result = reconcile_day(world.db, fetch, today, now=world.clock.now)
    assert result.state == "DIFFERS"
    assert kinds(world) == {
        "MISSING_HERE": ["SO0000000002", "SO0000000099"],
        "AMOUNT_DIFFERS": ["SO0000000003"],
        "STATUS_DIFFERS": ["SO0000000004"],
        "MISSING_AT_WECHAT": ["SO0000000002"],
        "ORPHAN_PAYMENT": ["SO0000000007"],
    }
    amount = rows(world.db, "SELECT ours_fen, theirs_fen FROM reconcile_diff WHERE kind = 'AMOUNT_DIFFERS'")
    assert amount == [{"ours_fen": 1279, "theirs_fen": 1280}]
    assert scalar(world.db, "SELECT COUNT(*) FROM reconcile_diff") == 6
    assert row(world.db, "goods_order2", 7)["refund_status"] == "NONE"  # reported by default, not refunded


def test_the_daily_job_waits_while_wechat_makes_the_bill_then_reconciles_once(world, db_url):
    from datetime import timedelta
    from types import SimpleNamespace

    from cancel_scanner.config import parse_config
    from cancel_scanner.operations.daily import reconcile_job
    from cancel_scanner.scanners import REGISTRY

    config = parse_config(
        {"database_url": db_url, "reconcile": {"retry_minutes": 7}}, REGISTRY, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}
    )
    app = SimpleNamespace(
        config=config, db=world.db, gateway=world.sandbox.gateway, runner=SimpleNamespace(clock=world.clock)
    )
    job = reconcile_job(app)
    yesterday = datetime.now(BEIJING).date() - timedelta(days=1)
    world.emulator.bill_ready_after = None
    world.emulator.statement_creating(yesterday)

    assert (job.name, job.at, job.catch_up) == ("reconcile", "10:00", True)
    assert job.run() == 7 * 60  # STATEMENT_CREATING: again in retry_minutes
    assert scalar(world.db, "SELECT state FROM reconcile_run WHERE bill_date = :d", d=yesterday) == "WAITING"
    world.emulator.statement_creating(yesterday, False)
    assert job.run() is None
    assert scalar(world.db, "SELECT state FROM reconcile_run WHERE bill_date = :d", d=yesterday) == "NO_BILL"
    asked = sum(world.emulator.bill_counts.values())
    assert (
        job.run() is None and sum(world.emulator.bill_counts.values()) == asked
    )  # done for the day: WeChat not asked again
    off = parse_config(
        {"database_url": db_url, "reconcile": {"enabled": False}}, REGISTRY, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}
    )
    assert reconcile_job(SimpleNamespace(config=off)) is None


def test_a_payment_refunded_in_parts_reconciles_clean_with_two_refunds_on_the_bill(world, today):
    add_goods(world.db, 1, stock=100, sales=50)
    add_order(world.db, 1, quantity=3, amount=1000)
    world.emulator.register_payment("SO0000000001", 1000, "4200000000001")
    request_cancel(world.db, 1, quantity=1)
    world.settle()
    request_cancel(world.db, 1, quantity=1)
    world.settle()
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE order_id = 1 AND wx_status = 'SUCCESS'") == 2

    result = reconcile_day(world.db, lambda day: fetch_bill(world.sandbox.gateway, day), today, now=world.clock.now)
    assert (result.state, result.diffs, result.bill_rows) == ("CLEAN", (), 3), result  # one payment, two refunds
    assert row(world.db, "goods_order2", 1)["refunded_amount"] == 666
