"""Unpaid orders with a real daemon: `cancel-scanner run` in a subprocess, live mode, on MariaDB.

Given a shop with paid orders, unpaid ones (NOTPAY at WeChat), ones the user paid whose
notification was lost, unpaid ones past the payment timeout (some of them also paid and lost),
and young unpaid ones nobody asked about, when merchants cancel some of them and the daemon runs,
then every cancel settles: the unpaid are closed at WeChat before they are cancelled (and the
emulator refuses the user's payment afterwards), the lost payments are booked and, if cancelled,
refunded once, timed-out orders close with cancel_source TIMEOUT, young ones are left alone, every
refund went to a paid trade, and stock and sales are exact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.acceptance import harness
from testsupport import shop
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql

GOODS = (1, 2, 3)
STOCK, SALES = 1_000, 5_000
PAID = range(1, 11)  # paid, cancelled: refunded
UNPAID = range(11, 21)  # NOTPAY, cancelled: closed, restocked
LOST = range(21, 26)  # the user paid, the shop never heard; cancelled: booked, refunded
TIMED_OUT = range(26, 31)  # NOTPAY, 40 minutes old, nobody asked: closed (TIMEOUT), restocked
TIMED_OUT_PAID = range(31, 34)  # paid and lost, 40 minutes old, nobody asked: booked, stays PAID
YOUNG = range(34, 36)  # NOTPAY, 10 minutes old, nobody asked: left alone


def test_a_mix_of_paid_unpaid_lost_and_timed_out_orders_settles_exactly(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    wechat = emu.emulator
    now = datetime.now(UTC).replace(tzinfo=None)
    shop.insert_goods(mysql_db, {g: (STOCK, SALES) for g in GOODS})
    orders = []
    for i in range(1, 36):
        old = i in TIMED_OUT or i in TIMED_OUT_PAID
        orders.append(
            shop.order_row(
                i,
                goods_id=GOODS[i % 3],
                quantity=1 + i % 2,
                amount=300 + i,
                paid=i in PAID,
                created_at=now - timedelta(minutes=40 if old else 10),
            )
        )
    shop.insert_orders(mysql_db, orders)
    by_id = {o["id"]: o for o in orders}
    for o in orders:
        if o["pay"]:
            wechat.register_payment(o["no"], o["amount"], o["txn"])
        else:
            wechat.create_trade(o["no"], o["amount"])
            if o["id"] in LOST or o["id"] in TIMED_OUT_PAID:
                wechat.user_pays(o["no"])  # and the shop's database is never told
    cancelled = [*PAID, *UNPAID, *LOST]
    shop.insert_requests(mysql_db, [(i, "MERCHANT_CANCEL", "clerk-2", "customer asked") for i in cancelled])

    daemon = daemons(tmp_path, harness.daemon_config(mysql_url, emu), emu.env())
    daemon.start()
    daemon.wait_started()
    harness.wait_settled(mysql_db, 90, [daemon])
    timed_out = [*TIMED_OUT, *TIMED_OUT_PAID]
    closed_sql = (
        f"SELECT COUNT(*) FROM goods_order2 WHERE close_scanned = 1 AND id IN ({', '.join(map(str, timed_out))})"
    )
    wait_until(
        lambda: harness.q_scalar(mysql_db, closed_sql),
        60,
        "the timed-out orders to close",
        until=lambda n: n == len(timed_out),
        daemons=[daemon],
    )
    harness.wait_settled(mysql_db, 60, [daemon])  # and what their settling started (restocking)
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0

    state = {r["id"]: r for r in harness.q_rows(mysql_db, "SELECT * FROM goods_order2")}
    for i in PAID:
        assert (state[i]["order_status"], state[i]["refund_status"]) == ("CANCELLED", "REFUNDED"), i
    for i in UNPAID:
        assert (state[i]["order_status"], state[i]["refund_status"], state[i]["pay_status"]) == (
            "CANCELLED",
            "NONE",
            0,
        ), i
    for i in LOST:
        assert (state[i]["pay_status"], state[i]["order_status"], state[i]["refund_status"]) == (
            1,
            "CANCELLED",
            "REFUNDED",
        ), i
    for i in TIMED_OUT:
        assert (state[i]["order_status"], state[i]["cancel_source"]) == ("CANCELLED", "TIMEOUT"), i
    for i in TIMED_OUT_PAID:
        assert (state[i]["pay_status"], state[i]["order_status"], state[i]["transaction_id"] is not None) == (
            1,
            "PAID",
            True,
        ), i
    for i in YOUNG:
        assert (state[i]["order_status"], state[i]["close_scanned"]) == ("UNPAID", 0), i

    # WeChat's side: every cancelled unpaid trade is closed and refuses the user's payment now;
    # every refund is of a paid trade, once.
    for i in [*UNPAID, *TIMED_OUT]:
        assert wechat.trade_state(by_id[i]["no"]) == "CLOSED" and wechat.user_pays(by_id[i]["no"]) is False, i
    assert wechat.payment_counts["refused_after_close"] == len(UNPAID) + len(TIMED_OUT)
    assert all(n == 1 for n in wechat.closed_trades.values())
    refunds = harness.q_rows(mysql_db, "SELECT order_id, out_trade_no, refund_amount, wx_status FROM refund_order")
    assert sorted(r["order_id"] for r in refunds) == sorted([*PAID, *LOST])
    for r in refunds:
        assert r["wx_status"] == "SUCCESS" and r["refund_amount"] == by_id[r["order_id"]]["amount"]
        assert wechat.trade_state(r["out_trade_no"]) == "REFUND"
    assert all(n == 1 for n in wechat.refunds_created.values())

    # Stock comes back for every cancel; sales: paid cancels take theirs back, lost payments found
    # at timeout are new sales, lost payments cancelled were booked and taken back.
    for g in GOODS:
        mine = [o for o in orders if o["goods"] == g]
        back = sum(o["qty"] for o in mine if o["id"] in (*PAID, *UNPAID, *LOST, *TIMED_OUT))
        new_sales = sum(o["qty"] for o in mine if o["id"] in TIMED_OUT_PAID)
        taken = sum(o["qty"] for o in mine if o["id"] in PAID)
        row = harness.q_rows(mysql_db, "SELECT stock, sales FROM goods WHERE id = :g", g=g)[0]
        assert (row["stock"], row["sales"]) == (STOCK + back, SALES + new_sales - taken), g
