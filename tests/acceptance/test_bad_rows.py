"""Issue 22's two scenarios with a real daemon (`cancel-scanner run` in a subprocess, live mode, MariaDB).

Given 20 unpaid cancels, one of whose orders a shop trigger locks ("order locked by after-sales"),
and 20 paid cancels, one of which someone else already logged as REFUND_SUBMITTED, when the daemon
runs, then the 19 other closes and all 20 refunds settle at once; the locked order alone waits,
closed at WeChat (kept in channel_fact, and said on its row and by `status`), its attempts counted;
once the shop lifts its rule, it is cancelled like the others. Every trade closed once, every refund
once, no traceback for the refusal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.acceptance import harness
from testsupport import shop
from testsupport.bad_rows import drop_shop_trigger, shop_trigger
from testsupport.processes import write_config
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql

UNPAID, PAID = range(1, 21), range(21, 41)
LOCKED, LOGGED = 7, 27
RULE = "order locked by after-sales"


def test_one_locked_order_and_one_stray_oplog_row_cost_only_themselves(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    now = datetime.now(UTC).replace(tzinfo=None)
    shop.insert_goods(mysql_db, {1: (1_000, 5_000)})
    orders = [shop.order_row(i, paid=i in PAID, created_at=now - timedelta(minutes=10)) for i in [*UNPAID, *PAID]]
    shop.insert_orders(mysql_db, orders)
    for o in orders:
        if o["pay"]:
            emu.emulator.register_payment(o["no"], o["amount"], o["txn"])
        else:
            emu.emulator.create_trade(o["no"], o["amount"])
    shop_trigger(
        mysql_db, "goods_order2", "UPDATE", f"OLD.id = {LOCKED} AND NEW.order_status <> OLD.order_status", message=RULE
    )
    with mysql_db.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO goods_order2_oplog (order_id, event, detail) VALUES ({LOGGED}, 'REFUND_SUBMITTED', 'by hand')"
        )
    shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])

    settings = harness.daemon_config(mysql_url, emu)
    config = write_config(tmp_path / "cli.yaml", settings)
    daemon = daemons(tmp_path, settings, emu.env())
    daemon.start()
    daemon.wait_started()
    others = [i for i in UNPAID if i != LOCKED]
    settled_sql = (
        f"SELECT COUNT(*) FROM goods_order2 WHERE (id IN ({', '.join(map(str, others))}) AND order_status = 'CANCELLED'"
        f" AND stock_success = 1) OR (id >= {PAID.start} AND refund_status = 'REFUNDED' AND sales_success = 1)"
    )
    wait_until(
        lambda: harness.q_scalar(mysql_db, settled_sql),
        60,
        "the 19 closes and 20 refunds",
        until=lambda n: n == len(others) + len(PAID),
        daemons=[daemon],
    )

    locked = harness.q_rows(mysql_db, f"SELECT * FROM goods_order2 WHERE id = {LOCKED}")[0]
    assert (locked["order_status"], locked["close_scanned"]) == ("UNPAID", 0) and locked["close_attempts"] >= 1
    assert locked["close_last_error"].startswith("SHOP_REFUSED: trade closed at WeChat Pay, not recorded here yet:")
    assert RULE in locked["close_last_error"]
    assert emu.emulator.trade_state(shop.order_row(LOCKED)["no"]) == "CLOSED"
    facts = harness.q_rows(mysql_db, "SELECT stage, row_id, fact, resolved_at FROM channel_fact")
    assert [(f["stage"], f["row_id"], f["fact"], f["resolved_at"]) for f in facts] == [
        ("close_unpaid", LOCKED, "PAYMENT_CLOSED", None)
    ]
    said = harness.status_json(config, emu.env(), tmp_path)
    assert said["channel_facts_open"] == 1
    logged = harness.q_rows(
        mysql_db, f"SELECT detail FROM goods_order2_oplog WHERE order_id = {LOGGED} AND event = 'REFUND_SUBMITTED'"
    )
    assert [r["detail"] for r in logged] == ["by hand"]  # kept, and the refund went on

    drop_shop_trigger(mysql_db)  # the shop lifts its rule: the order is cancelled by itself
    harness.wait_settled(mysql_db, 60, [daemon])
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    assert harness.q_scalar(mysql_db, f"SELECT order_status FROM goods_order2 WHERE id = {LOCKED}") == "CANCELLED"
    assert harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM channel_fact WHERE resolved_at IS NULL") == 0
    assert all(n == 1 for n in emu.emulator.closed_trades.values()) and len(emu.emulator.closed_trades) == len(UNPAID)
    assert sorted(emu.emulator.refunds_created.values()) == [1] * len(PAID)
    assert harness.q_scalar(mysql_db, "SELECT stock FROM goods WHERE id = 1") == 1_000 + len(UNPAID) + len(PAID)
    assert harness.q_scalar(mysql_db, "SELECT sales FROM goods WHERE id = 1") == 5_000 - len(PAID)
    assert not [r for r in daemon.logs() if r.get("action") == "row_crashed"]
