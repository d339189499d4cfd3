"""Reconciliation against WeChat Pay's daily bill: one difference of each kind planted in a day of
refunds the flow really made, and a clean day with none found; run twice, one set of rows.

On SQLite and MariaDB. The bills here are WeChat's view of the day built by hand (the emulator's
own bills, downloaded over HTTP, are tests/integration/test_bill_gateway.py's and the acceptance
test's); the orphan payment's refund goes through the real flow against the emulator.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, timedelta

import pytest

from cancel_scanner.operations.bill import Bill, BillNotReady, BillPayment, BillRefund, NoBill
from cancel_scanner.operations.reconcile import reconcile_day
from tests.flow import T0, add_goods, add_order, request_cancel, row, rows, scalar

DAY = date(2026, 11, 1)  # T0 is 2026-11-01 12:00 UTC, 20:00 in Beijing
UTC = UTC


def our_bill(world, day: date = DAY) -> Bill:
    """WeChat's bill of the day as it should be: every refund we had accepted, as we recorded it."""
    refunds = tuple(
        BillRefund(
            out_trade_no=f["out_trade_no"],
            out_refund_no=f["out_refund_no"],
            refund_fen=f["refund_amount"],
            status=f["wx_status"],
            wx_refund_id=f["wx_refund_id"] or "",
            transaction_id=f["transaction_id"] or "",
            at=T0.replace(tzinfo=UTC),
        )
        for f in rows(world.db, "SELECT * FROM refund_order WHERE submit_success = 1 ORDER BY id")
    )
    payments = tuple(
        BillPayment(
            out_trade_no=o["order_no"],
            transaction_id=o["transaction_id"],
            total_fen=o["total_amount"],
            status="SUCCESS",
            at=(T0 - timedelta(hours=2)).replace(tzinfo=UTC),
        )
        for o in rows(world.db, "SELECT * FROM goods_order2 WHERE pay_status = 1 ORDER BY id")
    )
    return Bill(bill_date=day, refunds=refunds, payments=payments, rows=len(refunds) + len(payments))


def refunded_day(world, n: int = 6) -> None:
    add_goods(world.db, 1, stock=100, sales=50)
    for i in range(1, n + 1):
        add_order(world.db, i)
        request_cancel(world.db, i)
    world.settle()


def an_order_cancelled_unpaid_whose_user_paid_anyway(world, order_id: int = 7) -> None:
    """The close said 204 and the order was cancelled as unpaid, but the payment went through."""
    add_order(world.db, order_id, paid=False, transaction_id=None)
    with world.db.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE goods_order2 SET order_status = 'CANCELLED', cancel_source = 'TIMEOUT', refund_status = 'NONE',"
            f" close_scanned = 1, close_success = 1, stock_scanned = 1, stock_success = 1 WHERE id = {order_id}"
        )


def fetcher(bills: dict[date, object]):
    return lambda day: bills.get(day, NoBill(day))


def diffs(world) -> list[dict]:
    return rows(
        world.db,
        "SELECT kind, out_trade_no, out_refund_no, ours_fen, theirs_fen, ours_status, theirs_status"
        " FROM reconcile_diff ORDER BY kind, out_trade_no",
    )


def test_a_clean_day_finds_nothing(world):
    refunded_day(world)
    result = reconcile_day(world.db, fetcher({DAY: our_bill(world)}), DAY, now=T0)
    assert (result.state, result.diffs, result.bill_rows) == ("CLEAN", (), 12)
    assert diffs(world) == []
    assert scalar(world.db, "SELECT state FROM reconcile_run WHERE bill_date = :d", d=DAY) == "CLEAN"


def test_one_difference_of_each_kind_is_found_once_and_a_second_run_leaves_one_set(world):
    refunded_day(world)
    an_order_cancelled_unpaid_whose_user_paid_anyway(world)
    good = our_bill(world)
    by_no = {f.out_refund_no: f for f in good.refunds}
    planted = [
        replace(by_no["CSR3-1"], refund_fen=by_no["CSR3-1"].refund_fen + 1),  # AMOUNT_DIFFERS
        replace(by_no["CSR4-1"], status="REFUNDCLOSE"),  # STATUS_DIFFERS (an older bill's name for CLOSED)
        by_no["CSR1-1"],
        by_no["CSR6-1"],
        BillRefund(
            "SO0000000999", "MANUAL-1", 500, "SUCCESS", "50300000999", "4200000999", T0.replace(tzinfo=UTC)
        ),  # MISSING_HERE
    ]  # CSR2-1 left out: MISSING_AT_WECHAT; CSR5-1 is in the next day's bill: not missing
    orphan = BillPayment("SO0000000007", "4200000000007", 1280, "SUCCESS", T0.replace(tzinfo=UTC))
    bill = replace(good, refunds=tuple(planted), payments=good.payments + (orphan,))
    next_day = Bill(bill_date=DAY + timedelta(days=1), refunds=(by_no["CSR5-1"],), payments=(), rows=1)
    bills = {DAY: bill, DAY + timedelta(days=1): next_day}

    first = reconcile_day(world.db, fetcher(bills), DAY, now=T0)
    again = reconcile_day(world.db, fetcher(bills), DAY, now=T0)

    assert first.state == again.state == "DIFFERS"
    assert first.counts == {
        "AMOUNT_DIFFERS": 1,
        "STATUS_DIFFERS": 1,
        "MISSING_HERE": 1,
        "MISSING_AT_WECHAT": 1,
        "ORPHAN_PAYMENT": 1,
    }
    assert diffs(world) == [
        {
            "kind": "AMOUNT_DIFFERS",
            "out_trade_no": "SO0000000003",
            "out_refund_no": "CSR3-1",
            "ours_fen": 1280,
            "theirs_fen": 1281,
            "ours_status": "SUCCESS",
            "theirs_status": "SUCCESS",
        },
        {
            "kind": "MISSING_AT_WECHAT",
            "out_trade_no": "SO0000000002",
            "out_refund_no": "CSR2-1",
            "ours_fen": 1280,
            "theirs_fen": None,
            "ours_status": "SUCCESS",
            "theirs_status": None,
        },
        {
            "kind": "MISSING_HERE",
            "out_trade_no": "SO0000000999",
            "out_refund_no": "MANUAL-1",
            "ours_fen": None,
            "theirs_fen": 500,
            "ours_status": None,
            "theirs_status": "SUCCESS",
        },
        {
            "kind": "ORPHAN_PAYMENT",
            "out_trade_no": "SO0000000007",
            "out_refund_no": None,
            "ours_fen": None,
            "theirs_fen": 1280,
            "ours_status": "CANCELLED",
            "theirs_status": "SUCCESS",
        },
        {
            "kind": "STATUS_DIFFERS",
            "out_trade_no": "SO0000000004",
            "out_refund_no": "CSR4-1",
            "ours_fen": 1280,
            "theirs_fen": 1280,
            "ours_status": "SUCCESS",
            "theirs_status": "CLOSED",
        },
    ]
    run = rows(world.db, "SELECT state, diffs, bill_rows, attempts FROM reconcile_run WHERE bill_date = :d", d=DAY)
    assert run == [{"state": "DIFFERS", "diffs": 5, "bill_rows": 12, "attempts": 2}]
    assert row(world.db, "goods_order2", 7)["refund_status"] == "NONE"  # reported, not refunded, by default

    clean = reconcile_day(world.db, fetcher({DAY: replace(good, payments=good.payments)}), DAY, now=T0)
    assert clean.state == "CLEAN" and diffs(world) == []  # a day reconciled again replaces its rows


def test_a_bill_not_ready_waits_and_a_day_without_a_bill_still_finds_our_refunds_missing(world):
    refunded_day(world, n=2)
    waiting = reconcile_day(
        world.db, fetcher({DAY: BillNotReady("STATEMENT_CREATING", "the bill is being made")}), DAY, now=T0
    )
    assert waiting.state == "WAITING" and "STATEMENT_CREATING" in waiting.message
    assert diffs(world) == []
    nothing = reconcile_day(world.db, fetcher({}), DAY, now=T0)  # NO_STATEMENT_EXIST, yet we refunded two
    assert nothing.state == "DIFFERS" and nothing.counts == {"MISSING_AT_WECHAT": 2}
    assert reconcile_day(world.db, fetcher({}), DAY + timedelta(days=3), now=T0).state == "NO_BILL"


def test_an_orphan_payment_is_refunded_through_the_flow_when_asked(world):
    refunded_day(world, n=1)
    an_order_cancelled_unpaid_whose_user_paid_anyway(world)
    world.emulator.register_payment("SO0000000007", 1280, "4200000000007")  # the payment WeChat holds
    sales_before, stock_before = row(world.db, "goods", 1)["sales"], row(world.db, "goods", 1)["stock"]
    orphan = BillPayment("SO0000000007", "4200000000007", 1280, "SUCCESS", T0.replace(tzinfo=UTC))
    good = our_bill(world)
    bill = replace(good, payments=good.payments + (orphan,))

    result = reconcile_day(world.db, fetcher({DAY: bill}), DAY, now=T0, refund_orphans=True)
    assert result.refunded_orphans == ("SO0000000007",)
    world.settle()

    order = row(world.db, "goods_order2", 7)
    assert (order["order_status"], order["pay_status"], order["refund_status"]) == ("CANCELLED", 1, "REFUNDED")
    assert world.emulator.refunds_created["CSR7-1"] == 1
    assert (row(world.db, "goods", 1)["sales"], row(world.db, "goods", 1)["stock"]) == (sales_before, stock_before)
    again = reconcile_day(world.db, fetcher({DAY: bill}), DAY, now=T0, refund_orphans=True)
    assert again.refunded_orphans == ()  # it has its refund now: never a second one
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE order_id = 7") == 1


@pytest.mark.mysql
def test_two_reconciliations_of_one_day_at_once_leave_one_set_of_rows(mysql_db, mysql_url, sandbox):
    """Two daemons' daily jobs (or a person beside one): the day's run row is locked first, so the
    second writes after the first and replaces its rows instead of adding its own."""
    import threading

    from tests.flow import World, test_config

    world = World(db=mysql_db, config=test_config(mysql_url), sandbox=sandbox)
    refunded_day(world, n=3)
    bill = replace(our_bill(world), refunds=())  # WeChat lists none of our three refunds
    barrier = threading.Barrier(2, timeout=10)
    results = []

    def fetch(day):
        if day == DAY:
            barrier.wait()  # both have fetched: they compare and record at the same moment
            return bill
        return NoBill(day)

    threads = [
        threading.Thread(target=lambda: results.append(reconcile_day(world.db, fetch, DAY, now=T0))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.counts for r in results] == [{"MISSING_AT_WECHAT": 3}] * 2
    assert scalar(world.db, "SELECT COUNT(*) FROM reconcile_diff WHERE bill_date = :d", d=DAY) == 3
    assert scalar(world.db, "SELECT attempts FROM reconcile_run WHERE bill_date = :d", d=DAY) == 2


def test_a_duplicated_line_and_a_payment_for_an_order_unpaid_here_are_two_differences_and_the_payment_is_booked(world):
    """Issue 23, item 4: lines with one refund number no longer collapse into one, and money WeChat
    took for an order still UNPAID here is reported and handed to close_unpaid, which books it."""
    from testsupport import shop

    refunded_day(world)
    shop.insert_orders(
        world.db, [shop.order_row(8, paid=False, amount=990, now=T0, created_at=T0 - timedelta(hours=3))]
    )
    world.emulator.create_trade(shop.order_row(8)["no"], 990)
    world.emulator.user_pays(shop.order_row(8)["no"])  # and the shop never hears of it
    good = our_bill(world)
    paid_here = BillPayment(
        out_trade_no=shop.order_row(8)["no"],
        transaction_id="4200000000000000000000000088",
        total_fen=990,
        status="SUCCESS",
        at=(T0 - timedelta(hours=2)).replace(tzinfo=UTC),
    )
    bill = replace(
        good, refunds=good.refunds + good.refunds[:1], payments=good.payments + (paid_here,), rows=good.rows + 2
    )

    result = reconcile_day(world.db, fetcher({DAY: bill}), DAY, now=T0)

    assert result.state == "DIFFERS"
    assert sorted((d["kind"], d["out_trade_no"]) for d in diffs(world)) == [
        ("DUPLICATE_LINE", good.refunds[0].out_trade_no),
        ("UNBOOKED_PAYMENT", shop.order_row(8)["no"]),
    ]
    order = row(world.db, "goods_order2", 8)
    assert order["close_scanned"] == 0 and order["close_last_error"].startswith("UNBOOKED_PAYMENT")
    runner = world.runner()
    try:
        runner.run_stage("close_unpaid", world.clock.now)
    finally:
        runner.close()
    order = row(world.db, "goods_order2", 8)
    assert (order["pay_status"], order["order_status"], order["close_success"]) == (
        1,
        "PAID",
        1,
    )  # booked; nobody cancelled it
