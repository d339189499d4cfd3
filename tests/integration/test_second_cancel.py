"""A second cancel of an unpaid order says what is true of the first (issue 23, item 7).

Given an unpaid order whose cancel was asked for, when a merchant asks again while close_unpaid is
still closing its payment, then the answer is DUPLICATE_REQUEST saying the first is still closing
(not "already cancelled"); and once that close failed for good, DUPLICATE_REQUEST saying it needs a
person and the order is still unpaid.
"""

from __future__ import annotations

from datetime import timedelta

from tests.flow import T0, add_goods, request_cancel, row, test_config
from testsupport import shop


def answer(world, request_id: int) -> tuple[str, str]:
    r = row(world.db, "req_order_ops", request_id)
    return r["result_code"], r["result_msg"]


def test_a_second_cancel_says_the_first_is_still_closing_then_that_it_failed_and_the_order_is_unpaid(world, db_url):
    world.config = test_config(db_url, jobs={"close_unpaid": {"max_attempts": 2, "retry_delays_seconds": [1]}})
    add_goods(world.db, 1)
    shop.insert_orders(world.db, [shop.order_row(1, paid=False, now=T0, created_at=T0 - timedelta(minutes=10))])
    world.emulator.create_trade(shop.order_row(1)["no"], 1280)
    world.emulator.fail_next(shop.order_row(1)["no"], "500", call="pay_close", times=10)
    first = request_cancel(world.db, 1)
    runner = world.runner()
    try:
        runner.run_stage("intake", world.clock.now)
        second = request_cancel(world.db, 1)
        runner.run_stage("intake", world.clock.now)
        code, message = answer(world, second)
        assert code == "DUPLICATE_REQUEST" and "still closing its WeChat payment" in message
        assert "already cancelled" not in message

        for _ in range(3):  # the close fails twice: given up, for a person
            runner.run_stage("close_unpaid", world.clock.now)
            world.clock.advance(5)
        order = row(world.db, "goods_order2", 1)
        assert (order["order_status"], order["close_scanned"], order["close_success"]) == ("UNPAID", 1, 0)

        third = request_cancel(world.db, 1)
        runner.run_stage("intake", world.clock.now)
    finally:
        runner.close()
    code, message = answer(world, third)
    assert code == "DUPLICATE_REQUEST" and "needs a person" in message and "still unpaid" in message
    assert answer(world, first)[0] == "OK"


def test_two_cancels_of_an_unpaid_order_in_one_batch_the_second_says_the_first_is_closing(world):
    add_goods(world.db, 1)
    shop.insert_orders(world.db, [shop.order_row(2, paid=False, now=T0, created_at=T0 - timedelta(minutes=10))])
    first, second = request_cancel(world.db, 2), request_cancel(world.db, 2)
    runner = world.runner()
    try:
        runner.run_stage("intake", world.clock.now)
    finally:
        runner.close()
    assert answer(world, first)[0] == "OK"
    code, message = answer(world, second)
    assert code == "DUPLICATE_REQUEST" and "still closing its WeChat payment" in message
