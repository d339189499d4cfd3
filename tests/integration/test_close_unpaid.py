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
from tests.flow import T0, add_goods, add_order, drop_index, refunds, request_cancel, row, rows, scalar
from testsupport import shop

TIMEOUT = timedelta(seconds=1800)


def trade_no(order_id: int) -> str:
    return shop.order_row(order_id)["no"]


def unpaid_order(
    world, order_id: int, *, trade: str | None = "NOTPAY", age: timedelta | None = None, quantity: int = 2
) -> None:
    """An unpaid order of goods ``order_id`` (stock 10, sales 10); its trade at WeChat in state ``trade``."""
    add_goods(world.db, order_id, stock=10, sales=10)
    created = T0 - (age if age is not None else timedelta(minutes=10))
    shop.insert_orders(
        world.db,
        [
            shop.order_row(
                order_id, goods_id=order_id, quantity=quantity, amount=500, paid=False, now=T0, created_at=created
            )
        ],
    )
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
    return [
        r["event"]
        for r in rows(world.db, "SELECT event FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id)
    ]


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
    assert (
        world.emulator.payment_counts["queries"] == 0 and row(world.db, "goods_order2", 4)["order_status"] == "UNPAID"
    )
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


def test_an_order_wechat_never_saw_is_cancelled_once_wechat_signs_that_its_close_found_no_trade(world):
    """Issue 23, item 1: the query's 404 is no proof; the close is sent, and its signed ORDER_NOT_EXIST is."""
    unpaid_order(world, 8, trade=None)
    request_cancel(world.db, 8)
    world.settle()
    assert row(world.db, "goods_order2", 8)["order_status"] == "CANCELLED"
    assert world.emulator.payment_counts == {"queries": 2, "closes": 1} and goods(world, 8) == (12, 10)


def test_a_signed_no_such_trade_to_a_close_of_a_trade_its_query_showed_cancels_nothing(world):
    """The close's answer names no trade: against a query that showed one NOTPAY, it proves nothing."""
    unpaid_order(world, 9)
    request_cancel(world.db, 9)
    world.emulator.fail_next(trade_no(9), "order_not_exist", times=3, call="pay_close")
    run_close(world)
    order = row(world.db, "goods_order2", 9)
    assert (order["order_status"], order["close_scanned"]) == ("UNPAID", 0)
    assert order["close_last_error"].startswith("CONTRADICTING_ANSWERS")
    assert world.emulator.trade_state(trade_no(9)) == "NOTPAY"
    world.settle()  # the fault spent, the close closes it, and only then is the order cancelled
    assert row(world.db, "goods_order2", 9)["order_status"] == "CANCELLED"
    assert world.emulator.trade_state(trade_no(9)) == "CLOSED" and world.emulator.user_pays(trade_no(9)) is False


@pytest.mark.parametrize("wrong", [1, 2, 3])
def test_a_query_that_wrongly_says_no_such_trade_never_cancels_an_order_that_can_still_be_paid(world, wrong):
    """Issue 23, item 1: the payment query answered ORDER_NOT_EXIST (once, twice, three times) for a
    trade that existed and was unpaid; before, two such answers cancelled the order without a close and
    the user could still pay it. Now the close is sent, and only WeChat's CLOSED afterwards cancels."""
    unpaid_order(world, 12)
    request_cancel(world.db, 12)
    world.emulator.fail_next(trade_no(12), "order_not_exist", times=wrong, call="pay_query")
    runner = world.runner()
    try:
        for _ in range(6):
            runner.run_until_idle(world.clock.now)
            order = row(world.db, "goods_order2", 12)
            if order["order_status"] == "CANCELLED":
                break
            assert world.emulator.trade_state(trade_no(12)) in ("NOTPAY", "CLOSED")
            world.clock.advance(30)
    finally:
        runner.close()
    assert order["order_status"] == "CANCELLED" and world.emulator.trade_state(trade_no(12)) == "CLOSED"
    assert world.emulator.closed_trades[trade_no(12)] == 1
    assert world.emulator.user_pays(trade_no(12)) is False  # the user can no longer pay it
    assert refunds(world.db) == {}


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
        conn.exec_driver_sql(
            "UPDATE goods_order2 SET pay_status = 1, order_status = 'PAID', transaction_id = 'T11',"
            " paid_at = created_at WHERE id = 11"
        )
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
    assert (
        max(world.emulator.max_in_flight.get(trade_no(i), 0) for i in range(20, 40)) == 1
    )  # one call per trade at a time
    for i in range(20, 40):
        order = row(world.db, "goods_order2", i)
        paid = i % 3 == 0
        assert order["refund_status"] == ("REFUNDED" if paid else "NONE"), i
        assert goods(world, i) == ((12, 10) if paid else (12, 10)), i
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = 'PAYMENT_FOUND'") == 7
    assert len(refunds(world.db)) == 7


V2_COLUMNS = (
    "cancel_requested_at",
    "close_scanned",
    "close_success",
    "close_attempts",
    "close_next_attempt_at",
    "close_last_error",
    "close_lease_owner",
    "close_lease_until",
)


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
        for index in (
            "idx_goods_order2_close_pending",
            "idx_goods_order2_close_lease_owner",
        ):  # the latter: version 3's
            drop_index(conn, "goods_order2", index)
        for column in V2_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE goods_order2 DROP COLUMN {column}")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (1, 'test')")
    before = rows(db, "SELECT id, order_no, pay_status, order_status, refund_status FROM goods_order2 ORDER BY id")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert the_plan.current == 1 and the_plan.head == migrate.head_version()
    migrate.apply(db, the_plan)
    assert schema_problem(db) is None and migration_plan(db).steps == []
    assert (
        rows(db, "SELECT id, order_no, pay_status, order_status, refund_status FROM goods_order2 ORDER BY id") == before
    )
    assert [
        tuple(r.values())
        for r in rows(
            db, "SELECT close_scanned, close_success, close_attempts, cancel_requested_at FROM goods_order2 ORDER BY id"
        )
    ] == [(0, 0, 0, None)] * 2


# -- attacks ------------------------------------------------------------------------------------------


class Between:
    """The real gateway, with something happening in the world right before or after the close."""

    def __init__(self, gateway, *, before_close=None, after_close=None):
        self._gateway, self._before, self._after = gateway, before_close, after_close

    def __getattr__(self, name):
        return getattr(self._gateway, name)

    def close_payment(self, out_trade_no, **kw):
        if self._before:
            self._before(out_trade_no)
        result = self._gateway.close_payment(out_trade_no, **kw)
        if self._after:
            self._after(out_trade_no)
        return result


def run_close(world, runner=None):
    """Intake, then one batch of close_unpaid at the world's time."""
    runner = runner or world.runner()
    runner.run_stage("intake", world.clock.now)
    return runner.run_stage("close_unpaid", world.clock.now)


@pytest.mark.parametrize("kind", ["500", "drop", "redirect", "slow"])
def test_a_close_that_never_closed_the_trade_leaves_the_order_unpaid_though_the_next_query_says_notpay(world, kind):
    unpaid_order(world, 41)
    request_cancel(world.db, 41)
    world.emulator.fail_next(trade_no(41), kind, call="pay_close", slow_seconds=3)
    run_close(world)
    order = row(world.db, "goods_order2", 41)
    assert (order["order_status"], order["close_scanned"]) == ("UNPAID", 0), "cancelled while the trade is payable"
    assert world.emulator.trade_state(trade_no(41)) in (
        "NOTPAY",
        "CLOSED",
    )  # "slow": processed after the client gave up
    world.settle()
    assert row(world.db, "goods_order2", 41)["order_status"] == "CANCELLED"
    assert world.emulator.closed_trades[trade_no(41)] == 1 and world.emulator.user_pays(trade_no(41)) is False


@pytest.mark.parametrize("kind", ["500", "drop", "bad_signature", "redirect"])
def test_a_close_that_closed_the_trade_but_answered_a_fault_is_settled_by_the_query_after_it(world, kind):
    unpaid_order(world, 42)
    request_cancel(world.db, 42)
    world.emulator.fail_next(trade_no(42), kind, call="pay_close", after_commit=True)
    run_close(world)
    order = row(world.db, "goods_order2", 42)
    assert (order["order_status"], order["close_success"]) == ("CANCELLED", 1)
    assert world.emulator.closed_trades[trade_no(42)] == 1 and world.emulator.faults_injected[f"{kind}/after"] == 1


def test_a_query_after_the_close_that_fails_neither_cancels_nor_books(world):
    unpaid_order(world, 43)
    world.emulator.pays_while_closing(trade_no(43))  # the truth after the close: paid
    request_cancel(world.db, 43)
    spoil = lambda no: world.emulator.fail_next(no, "500", call="pay_query", after_commit=True)  # noqa: E731
    run_close(world, world.runner(gateway=Between(world.sandbox.gateway, after_close=spoil)))
    order = row(world.db, "goods_order2", 43)
    assert (order["order_status"], order["pay_status"], order["close_scanned"]) == ("UNPAID", 0, 0)
    assert order["close_last_error"].startswith("SYSTEM_ERROR") and events(world, 43) == []
    world.settle()
    order = row(world.db, "goods_order2", 43)
    assert (order["pay_status"], order["refund_status"]) == (1, "REFUNDED") and len(refunds(world.db)) == 1
    assert events(world, 43).count("PAYMENT_FOUND") == 1 and goods(world, 43) == (12, 10)


def test_a_query_after_the_close_that_runs_out_of_lease_is_not_a_crash(world):
    unpaid_order(world, 44)
    request_cancel(world.db, 44)
    offset = [0.0]

    def lease_runs_out(no):
        offset[0] += 3600  # the process stalls past its lease between the close and the query after it

    runner = world.runner(
        gateway=Between(world.sandbox.gateway, after_close=lease_runs_out),
        monotonic=lambda: __import__("time").monotonic() + offset[0],
    )
    run_close(world, runner)
    order = row(world.db, "goods_order2", 44)
    assert (order["order_status"], order["close_scanned"]) == ("UNPAID", 0)
    world.settle()
    assert row(world.db, "goods_order2", 44)["order_status"] == "CANCELLED"
    assert world.emulator.closed_trades[trade_no(44)] == 1


def test_a_payment_of_another_amount_is_left_for_a_person_and_requeue_gives_it_another_go(world):
    from cancel_scanner.engine.requeue import requeue
    from cancel_scanner.engine.status import collect_status
    from cancel_scanner.scanners import build_stages

    unpaid_order(world, 45, trade=None)
    world.emulator.create_trade(trade_no(45), 400)  # WeChat's trade says 4 yuan, the order 5
    world.emulator.user_pays(trade_no(45))
    request_cancel(world.db, 45)
    world.settle()
    order = row(world.db, "goods_order2", 45)
    assert (order["close_scanned"], order["close_success"], order["pay_status"]) == (1, 0, 0)
    assert order["close_last_error"].startswith("PAID_AMOUNT_DIFFERS") and order["order_status"] == "UNPAID"
    assert refunds(world.db) == {} and goods(world, 45) == (10, 10) and world.emulator.payment_counts["closes"] == 0
    stages = build_stages(world.config)
    (close,) = [s for s in collect_status(world.db, stages, world.clock.now).stages if s.stage == "close_unpaid"]
    assert (close.failed, close.pending) == (1, 0)

    with world.db.begin() as conn:  # a person finds the order's amount was wrong
        conn.exec_driver_sql("UPDATE goods_order2 SET total_amount = 400 WHERE id = 45")
    assert requeue(world.db, stages["close_unpaid"], [45], world.clock.now, "ops-anna") == 1
    assert requeue(world.db, stages["close_unpaid"], [45], world.clock.now, "ops-anna") == 0
    world.settle()
    order = row(world.db, "goods_order2", 45)
    assert (order["close_success"], order["pay_status"], order["refund_status"]) == (1, 1, "REFUNDED")
    (refund,) = refunds(world.db).values()
    assert refund["refund_amount"] == 400 and goods(world, 45) == (12, 10)


def test_a_payment_answer_about_another_trade_is_never_booked_to_this_order(world):
    unpaid_order(world, 46)
    unpaid_order(world, 47, trade="SUCCESS")
    world.emulator.answers_about(trade_no(46), trade_no(47))
    request_cancel(world.db, 46)
    run_close(world)
    order = row(world.db, "goods_order2", 46)
    assert (order["pay_status"], order["order_status"], order["close_scanned"]) == (0, "UNPAID", 0)
    assert order["close_last_error"].startswith("RESPONSE_MISMATCH") and world.emulator.payment_counts["closes"] == 0
    assert events(world, 46) == [] and goods(world, 46) == (10, 10)


@pytest.mark.parametrize(
    "other",
    [
        {"mchid": "1900000999"},
        {"appid": "wx00000000000other"},
        {"currency": "USD"},
        {"mchid": "1900000999", "appid": "wx00000000000other"},
    ],
)
def test_a_signed_paid_answer_about_another_merchants_app_or_currency_is_never_booked_nor_refunded(world, other):
    """Issue 23, item 2: SUCCESS, signed, our number, but not our merchant's money in yuan."""
    unpaid_order(world, 48, trade="SUCCESS")
    world.emulator.answers_as(trade_no(48), **other)
    request_cancel(world.db, 48)
    run_close(world)
    order = row(world.db, "goods_order2", 48)
    assert (order["pay_status"], order["order_status"], order["close_scanned"], order["close_success"]) == (
        0,
        "UNPAID",
        1,
        0,
    )
    assert order["close_last_error"].startswith("FOREIGN_PAYMENT: the answer ")
    assert refunds(world.db) == {} and events(world, 48) == [] and goods(world, 48) == (10, 10)
    assert world.emulator.payment_counts["closes"] == 0


def test_a_user_who_pays_between_the_first_query_and_the_close_is_booked_and_refunded_once(world):
    unpaid_order(world, 48)
    request_cancel(world.db, 48)

    def pays(no):
        world.emulator.user_starts_paying(no)
        world.emulator.user_pays(no)

    world.settle(world.runner(gateway=Between(world.sandbox.gateway, before_close=pays)))
    order = row(world.db, "goods_order2", 48)
    assert (order["pay_status"], order["refund_status"]) == (1, "REFUNDED") and len(refunds(world.db)) == 1
    assert world.emulator.closed_trades[trade_no(48)] == 0 and goods(world, 48) == (12, 10)


def test_a_user_on_the_password_screen_at_the_close_is_not_closed_on(world):
    unpaid_order(world, 49)
    request_cancel(world.db, 49)
    run_close(
        world, world.runner(gateway=Between(world.sandbox.gateway, before_close=world.emulator.user_starts_paying))
    )
    order = row(world.db, "goods_order2", 49)
    assert (order["order_status"], order["close_scanned"]) == ("UNPAID", 0)
    assert world.emulator.trade_state(trade_no(49)) == "USERPAYING"


@pytest.mark.parametrize("requested", [True, False])
def test_the_shop_booking_the_payment_between_the_call_and_the_write_books_it_once(world, requested):
    unpaid_order(world, 50, trade="SUCCESS", age=TIMEOUT + timedelta(minutes=1))
    if requested:
        request_cancel(world.db, 50)

    def shop_books(stage, r, result):
        if stage == "close_unpaid":
            with world.db.begin() as conn:
                conn.exec_driver_sql(
                    "UPDATE goods_order2 SET pay_status = 1, order_status = 'PAID', transaction_id = 'T50',"
                    " paid_at = created_at WHERE id = 50"
                )
                conn.exec_driver_sql("UPDATE goods SET sales = sales + 2 WHERE id = 50")

    run_close(world, world.runner(Hooks(after_gateway_call=shop_books)))
    world.settle()
    order = row(world.db, "goods_order2", 50)
    assert "PAYMENT_FOUND" not in events(world, 50) and order["close_success"] == 1
    if requested:
        assert (order["refund_status"], goods(world, 50)) == ("REFUNDED", (12, 10)) and len(refunds(world.db)) == 1
    else:
        assert (order["order_status"], goods(world, 50)) == ("PAID", (10, 12)) and refunds(world.db) == {}


def test_an_order_soft_deleted_while_its_cancel_waits_is_left_alone(world):
    unpaid_order(world, 51)
    request_cancel(world.db, 51)
    world.runner().run_stage("intake", world.clock.now)
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE goods_order2 SET is_deleted = 1 WHERE id = 51")
    world.settle()
    assert (
        world.emulator.payment_counts["queries"] == 0 and row(world.db, "goods_order2", 51)["order_status"] == "UNPAID"
    )


@pytest.mark.parametrize("trade", ["SUCCESS", "NOTPAY"])
def test_an_order_soft_deleted_during_the_calls_is_not_booked_nor_cancelled(world, trade):
    unpaid_order(world, 52, trade=trade)
    request_cancel(world.db, 52)

    def deleted(stage, r, result):
        if stage == "close_unpaid":
            with world.db.begin() as conn:
                conn.exec_driver_sql("UPDATE goods_order2 SET is_deleted = 1 WHERE id = 52")

    world.settle(world.runner(Hooks(after_gateway_call=deleted)))
    order = row(world.db, "goods_order2", 52)
    assert (order["pay_status"], order["order_status"]) == (0, "UNPAID") and goods(world, 52) == (10, 10)
    assert refunds(world.db) == {} and events(world, 52) == []


def test_an_unpaid_order_the_shop_ships_while_wechat_says_paid_goes_to_a_person_not_round_forever(world):
    unpaid_order(world, 53, trade="SUCCESS")
    request_cancel(world.db, 53)
    world.runner().run_stage("intake", world.clock.now)
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE goods_order2 SET order_status = 'SHIPPED' WHERE id = 53")
    world.settle()
    order = row(world.db, "goods_order2", 53)
    assert (order["close_scanned"], order["close_success"], order["pay_status"]) == (1, 0, 0)
    assert goods(world, 53) == (10, 10) and refunds(world.db) == {}


def test_a_lease_lost_while_the_calls_ran_drops_the_answer_and_the_new_holder_books_once(world):
    unpaid_order(world, 54, trade="SUCCESS", age=TIMEOUT + timedelta(minutes=1))
    unpaid_order(world, 55, age=TIMEOUT + timedelta(minutes=1))
    taken = []

    def another_runner_takes_over(stage, r, result):
        if stage == "close_unpaid" and not taken:
            taken.append(r.id)
            world.clock.advance(120)  # slow calls: the lease (60 s) is over, a second runner takes the rows
            world.runner(owner="b").run_until_idle(world.clock.now, stages=["close_unpaid"])

    # One call at a time in the first runner: its other row's calls are never still in flight while the
    # second runner works (the clock that expired its lease is the database's, not its calls' deadline).
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages
    from tests.flow import test_config

    one_at_a_time = test_config(
        world.config.database_url, jobs={"close_unpaid": {"concurrency": 1, "lease_seconds": 60}}
    )
    first = Runner(
        world.db,
        one_at_a_time,
        build_stages(one_at_a_time),
        world.sandbox.gateway,
        clock=world.clock,
        hooks=Hooks(after_gateway_call=another_runner_takes_over),
        owner="a",
    )
    try:
        first.run_stage("close_unpaid", world.clock.now)
    finally:
        first.close()
    world.settle()
    assert events(world, 54) == ["PAYMENT_FOUND"] and goods(world, 54) == (10, 12)
    assert row(world.db, "goods_order2", 55)["order_status"] == "CANCELLED" and goods(world, 55) == (12, 10)
    assert world.emulator.closed_trades[trade_no(55)] == 1
    assert max(world.emulator.max_in_flight[trade_no(i)] for i in (54, 55)) == 1


@pytest.mark.mysql
def test_a_found_payment_whose_goods_row_the_shop_holds_waits_and_is_booked_once(mysql_db, mysql_url, sandbox):
    """MariaDB only: SQLite has one writer, so nobody can hold a goods row beside us."""
    from tests.flow import World, test_config

    world = World(db=mysql_db, config=test_config(mysql_url), sandbox=sandbox)
    unpaid_order(world, 56, trade="SUCCESS", age=TIMEOUT + timedelta(minutes=1))
    with world.db.connect() as shop_conn:
        shop_conn.exec_driver_sql("BEGIN")
        shop_conn.exec_driver_sql("SELECT * FROM goods WHERE id = 56 FOR UPDATE")  # a long checkout
        report = world.runner().run_stage("close_unpaid", world.clock.now)
        assert report.later == 1
        order = row(world.db, "goods_order2", 56)
        assert (order["pay_status"], order["close_scanned"]) == (0, 0) and order["close_last_error"].startswith(
            "ORDER_BUSY"
        )
        shop_conn.exec_driver_sql("ROLLBACK")
    world.clock.advance(2)
    world.settle()
    assert events(world, 56) == ["PAYMENT_FOUND"] and goods(world, 56) == (10, 12)


def test_a_pay_timeout_under_five_minutes_is_a_one_line_configuration_error(tmp_path):
    from click.testing import CliRunner

    from cancel_scanner.cli import main

    path = tmp_path / "jobs.yaml"
    path.write_text(
        f"database_url: sqlite:///{tmp_path / 'x.db'}\njobs:\n  close_unpaid:\n    pay_timeout_seconds: 299\n"
    )
    result = CliRunner().invoke(main, ["--config", str(path), "initdb"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "jobs.close_unpaid.pay_timeout_seconds" in line and not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("kind", ["500", "drop", "bad_signature", "redirect"])
def test_a_spoiled_answer_to_the_first_query_of_a_paid_trade_books_nothing_until_a_clean_one(world, kind):
    unpaid_order(world, 57, trade="SUCCESS")
    request_cancel(world.db, 57)
    world.emulator.fail_next(trade_no(57), kind, call="pay_query", after_commit=True)
    run_close(world)
    order = row(world.db, "goods_order2", 57)
    assert (order["pay_status"], order["order_status"], order["close_scanned"]) == (0, "UNPAID", 0)
    assert events(world, 57) == [] and world.emulator.payment_counts["closes"] == 0
    world.settle()
    assert (
        events(world, 57).count("PAYMENT_FOUND") == 1 and len(refunds(world.db)) == 1 and goods(world, 57) == (12, 10)
    )


def test_wechats_no_such_trade_to_a_close_counts_only_under_its_signature(world):
    import cancel_scanner.gateway.contract as gw
    from cancel_scanner.gateway.calls import Capture

    gateway = world.sandbox.gateway
    assert isinstance(
        gateway.close_payment("SO9999999999"), gw.NoSuchTrade
    )  # the emulator signs its answers, errors too
    body = '{"code":"ORDER_NOT_EXIST","message":"order does not exist"}'
    assert not gateway._signed_by_wechat(Capture(), body)  # a proxy's 404: no signature at all
    assert not gateway._signed_by_wechat(
        Capture(signature={"Wechatpay-Serial": "PUB_KEY_ID_0000000000000000000000000000"}), body
    )
    forged = {
        "Wechatpay-Serial": world.sandbox.keys.platform_public_key_id,
        "Wechatpay-Timestamp": "1700000000",
        "Wechatpay-Nonce": "n",
        "Wechatpay-Signature": "AAAA",
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
    }
    assert not gateway._signed_by_wechat(
        Capture(signature=forged), body
    )  # our serial, a signature that does not verify
