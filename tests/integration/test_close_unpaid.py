"""close_unpaid: an unpaid order is settled with WeChat before anything local changes.

SQLite and MariaDB, the real SDK over HTTP to the emulator, which keeps each trade's state. Given
an order the database says is unpaid, when its cancel is requested or its payment times out,
then: a trade nobody paid is closed at WeChat first (and stays closed: the user can no longer pay
it), the order is cancelled and its stock comes back; a trade the user did pay (its notification
lost) is booked as paid, and a requested cancel refunds it once; a user in the middle of paying
is never closed on; a 204 is never taken for proof.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from cancel_scanner.engine.runner import Hooks
from cancel_scanner.scanners.close_unpaid import MIN_AGE
from tests.flow import T0, add_goods, add_order, refunds, request_cancel, row, rows, scalar
from testsupport import shop

TIMEOUT = timedelta(seconds=1800)


def trade_no(order_id: int) -> str:
    return shop.order_row(order_id)["no"]


def unpaid_order(world, order_id: int, *, trade: str | None = "NOTPAY", age: timedelta | None = None, quantity: int = 2) -> None:
    """An unpaid order of goods ``order_id`` (stock 10, sales 10); its trade at WeChat in state ``trade``."""
    add_goods(world.db, order_id, stock=10, sales=10)
    created = T0 - (age if age is not None else timedelta(minutes=10))
    shop.insert_orders(world.db, [shop.order_row(order_id, goods_id=order_id, quantity=quantity, amount=500, paid=False,
                                                 now=T0, created_at=created)])
    if trade is not None:
        world.emulator.create_trade(trade_no(order_id), 500)
        if trade == "SUCCESS":
            world.emulator.user_pays(trade_no(order_id))  # and the shop's database is never told
        elif trade == "USERPAYING":
            world.emulator.user_starts_paying(trade_no(order_id))


def goods(world, goods_id: int) -> tuple[int, int]:
    g = row(world.db, "goods", goods_id)
    return g["stock"], g["sales"]


def events(world, order_id: int) -> list[str]:
    return [r["event"] for r in rows(world.db, "SELECT event FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id)]


def test_a_requested_cancel_closes_the_trade_first_then_cancels_and_restocks(world):
    unpaid_order(world, 1)
    rid = request_cancel(world.db, 1)
    runner = world.runner()
    runner.run_stage("intake", world.clock.now)
    request = row(world.db, "req_order_ops", rid)
    assert request["result_code"] == "OK" and "being closed" in request["result_msg"]
    assert row(world.db, "goods_order2", 1)["order_status"] == "UNPAID"  # not before WeChat confirms

    world.settle()
    order = row(world.db, "goods_order2", 1)
    assert (order["order_status"], order["cancel_source"], order["refund_status"]) == ("CANCELLED", "MERCHANT", "NONE")
    assert (order["close_scanned"], order["close_success"], order["stock_success"]) == (1, 1, 1)
    assert world.emulator.trade_state(trade_no(1)) == "CLOSED" and world.emulator.closed_trades[trade_no(1)] == 1
    assert goods(world, 1) == (12, 10)
    assert events(world, 1) == ["PAYMENT_CLOSED", "CANCELLED", "STOCK_RESTORED"]
    assert world.emulator.user_pays(trade_no(1)) is False  # the user, still on the payment page, cannot pay it now
    assert world.emulator.payment_counts["refused_after_close"] == 1
    assert refunds(world.db) == {}


def test_a_timed_out_order_is_closed_and_a_younger_one_is_left_alone(world):
    unpaid_order(world, 2, age=TIMEOUT + timedelta(minutes=1))
    unpaid_order(world, 3, age=TIMEOUT - timedelta(minutes=1))
    world.settle()
    old, young = row(world.db, "goods_order2", 2), row(world.db, "goods_order2", 3)
    assert (old["order_status"], old["cancel_source"], old["stock_success"]) == ("CANCELLED", "TIMEOUT", 1)
    assert goods(world, 2) == (12, 10)
    assert (young["order_status"], young["close_scanned"]) == ("UNPAID", 0)
    assert world.emulator.trade_state(trade_no(3)) == "NOTPAY" and world.emulator.payment_counts["closes"] == 1


def test_an_order_younger_than_five_minutes_is_not_closed_even_when_its_cancel_is_asked(world):
    unpaid_order(world, 4, age=timedelta(minutes=1))
    request_cancel(world.db, 4)
    runner = world.runner()
    runner.run_until_idle(world.clock.now)
    assert world.emulator.payment_counts["queries"] == 0 and row(world.db, "goods_order2", 4)["order_status"] == "UNPAID"
    world.clock.advance((MIN_AGE - timedelta(minutes=1)).total_seconds())
    world.settle()
    assert row(world.db, "goods_order2", 4)["order_status"] == "CANCELLED"


def test_a_lost_payment_notification_is_booked_and_a_requested_cancel_refunds_it_once(world):
    unpaid_order(world, 5, trade="SUCCESS", quantity=3)
    request_cancel(world.db, 5)
    world.settle()
    order = row(world.db, "goods_order2", 5)
    assert (order["pay_status"], order["order_status"], order["refund_status"]) == (1, "CANCELLED", "REFUNDED")
    assert order["transaction_id"] and order["paid_at"] is not None
    (refund,) = refunds(world.db).values()
    assert (refund["refund_amount"], refund["wx_status"], refund["out_trade_no"]) == (500, "SUCCESS", trade_no(5))
    assert world.emulator.refunds_created[refund["out_refund_no"]] == 1
    assert world.emulator.payment_counts["closes"] == 0  # a paid trade is never closed
    # Booked (+3 sales), then the cancel took the sale back (-3) and restocked (+3).
    assert goods(world, 5) == (13, 10)
    assert events(world, 5)[:2] == ["PAYMENT_FOUND", "CANCELLED"]


def test_a_lost_payment_found_at_timeout_is_booked_and_the_order_stays_paid(world):
    unpaid_order(world, 6, trade="SUCCESS", age=TIMEOUT + timedelta(minutes=5))
    world.settle()
    order = row(world.db, "goods_order2", 6)
    assert (order["pay_status"], order["order_status"], order["close_success"]) == (1, "PAID", 1)
    assert goods(world, 6) == (10, 12) and refunds(world.db) == {}


def test_a_user_in_the_middle_of_paying_is_never_closed_on(world):
    unpaid_order(world, 7, trade="USERPAYING")
    request_cancel(world.db, 7)
    runner = world.runner()
    runner.run_until_idle(world.clock.now)
    order = row(world.db, "goods_order2", 7)
    assert order["close_scanned"] == 0 and order["close_last_error"].startswith("USER_PAYING")
    assert world.emulator.trade_state(trade_no(7)) == "USERPAYING"
    world.emulator.user_pays(trade_no(7))
    world.clock.advance(31)
    world.settle()
    assert row(world.db, "goods_order2", 7)["refund_status"] == "REFUNDED"
    assert len(refunds(world.db)) == 1


def test_an_order_wechat_never_saw_is_cancelled_without_a_close(world):
    unpaid_order(world, 8, trade=None)
    request_cancel(world.db, 8)
    world.settle()
    assert row(world.db, "goods_order2", 8)["order_status"] == "CANCELLED"
    assert world.emulator.payment_counts["closes"] == 0 and goods(world, 8) == (12, 10)


def test_a_204_is_no_proof_a_payment_that_lands_during_the_close_is_refunded(world):
    unpaid_order(world, 9)
    world.emulator.pays_while_closing(trade_no(9))
    request_cancel(world.db, 9)
    world.settle()
    order = row(world.db, "goods_order2", 9)
    assert (order["pay_status"], order["refund_status"]) == (1, "REFUNDED")
    assert world.emulator.payment_counts["closes"] == 1 and len(refunds(world.db)) == 1


def test_a_crash_between_the_close_and_the_commit_is_settled_by_the_next_query(world):
    unpaid_order(world, 10)
    request_cancel(world.db, 10)
    def power_cut(stage, ids):
        if stage == "close_unpaid":
            raise RuntimeError("power cut")

    runner = world.runner(Hooks(before_commit=power_cut))
    runner.run_stage("intake", world.clock.now)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.run_stage("close_unpaid", world.clock.now)  # WeChat answered; the commit never happened
    assert row(world.db, "goods_order2", 10)["order_status"] == "UNPAID"
    assert world.emulator.trade_state(trade_no(10)) == "CLOSED"  # WeChat did close it
    world.clock.advance(120)  # the lease the dead batch held expires
    world.settle()
    assert row(world.db, "goods_order2", 10)["order_status"] == "CANCELLED"
    assert world.emulator.closed_trades[trade_no(10)] == 1


def test_a_payment_the_shop_books_late_turns_a_requested_cancel_into_a_refund(world):
    unpaid_order(world, 11, trade="SUCCESS")
    request_cancel(world.db, 11)
    world.runner().run_stage("intake", world.clock.now)
    with world.db.begin() as conn:  # the shop's late notification handler books it first
        conn.exec_driver_sql("UPDATE goods_order2 SET pay_status = 1, order_status = 'PAID', transaction_id = 'T11',"
                             " paid_at = created_at WHERE id = 11")
        conn.exec_driver_sql("UPDATE goods SET sales = sales + 2 WHERE id = 11")
    world.settle()
    order = row(world.db, "goods_order2", 11)
    assert (order["order_status"], order["refund_status"]) == ("CANCELLED", "REFUNDED")
    assert goods(world, 11) == (12, 10)  # booked once (by the shop), taken back once
    assert "PAYMENT_FOUND" not in events(world, 11)


def test_two_daemons_over_the_same_unpaid_orders_close_each_trade_once_and_book_each_payment_once(world):
    for i in range(20, 40):
        unpaid_order(world, i, trade="SUCCESS" if i % 3 == 0 else "NOTPAY")
        request_cancel(world.db, i)
    world.runner().run_stage("intake", world.clock.now)
    first, second = world.runner(owner="a"), world.runner(owner="b")
    barrier = threading.Barrier(2)

    def run(runner):
        barrier.wait(5)
        runner.run_until_idle(world.clock.now)

    threads = [threading.Thread(target=run, args=(r,)) for r in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    world.settle()
    assert all(n <= 1 for n in world.emulator.closed_trades.values())
    assert max(world.emulator.max_in_flight.get(trade_no(i), 0) for i in range(20, 40)) == 1  # one call per trade at a time
    for i in range(20, 40):
        order = row(world.db, "goods_order2", i)
        paid = i % 3 == 0
        assert order["refund_status"] == ("REFUNDED" if paid else "NONE"), i
        assert goods(world, i) == ((12, 10) if paid else (12, 10)), i
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = 'PAYMENT_FOUND'") == 7
    assert len(refunds(world.db)) == 7


V2_COLUMNS = ("cancel_requested_at", "close_scanned", "close_success", "close_attempts", "close_next_attempt_at",
              "close_last_error", "close_lease_owner", "close_lease_until")


def test_a_version_1_database_migrates_to_the_close_stage_and_its_orders_read_untouched(db, db_url):
    """Schema version 2 brought close_unpaid: a database at version 1 (head minus its columns and
    index) is brought there by migrate, every row as it was, every old order 'never closed'."""
    from cancel_scanner.app import migration_plan, schema_problem
    from cancel_scanner.engine import migrate

    add_goods(db, 1)
    add_order(db, 1, paid=False)
    add_order(db, 2)
    with db.begin() as conn:
        conn.exec_driver_sql("DROP VIEW IF EXISTS v_cancel_scanner_failed")
        if db.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP INDEX idx_goods_order2_close_pending")
        else:
            conn.exec_driver_sql("ALTER TABLE goods_order2 DROP INDEX idx_goods_order2_close_pending")
        for column in V2_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE goods_order2 DROP COLUMN {column}")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (1, 'test')")
    before = rows(db, "SELECT id, order_no, pay_status, order_status, refund_status FROM goods_order2 ORDER BY id")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert the_plan.current == 1 and the_plan.head == 2
    migrate.apply(db, the_plan)
    assert schema_problem(db) is None and migration_plan(db).steps == []
    assert rows(db, "SELECT id, order_no, pay_status, order_status, refund_status FROM goods_order2 ORDER BY id") == before
    assert [tuple(r.values()) for r in rows(db, "SELECT close_scanned, close_success, close_attempts, cancel_requested_at"
                                               " FROM goods_order2 ORDER BY id")] == [(0, 0, 0, None)] * 2
