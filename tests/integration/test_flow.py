"""The merchant-cancel flow end to end, on SQLite and MariaDB, against the emulator over HTTP."""

from __future__ import annotations

from collections import Counter

import pytest

from cancel_scanner.engine.runner import Hooks
from cancel_scanner.scanners.intake import out_refund_no_for
from tests.flow import add_goods, add_order, checksum, pending, refunds, request_cancel, row, rows, scalar


class PowerCut(BaseException):
    """Not an error the process handles: it is simply gone."""


def events(world, order_id):
    return [
        r["event"]
        for r in rows(world.db, "SELECT event FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id)
    ]


def test_a_paid_order_cancelled_by_its_merchant_is_refunded_once_and_stock_and_sales_corrected(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 101, goods_id=1, quantity=2, amount=1280)
    req = request_cancel(world.db, 101)

    world.settle()

    request = row(world.db, "req_order_ops", req)
    assert (request["scanned"], request["success"], request["result_code"]) == (1, 1, "OK")
    order = row(world.db, "goods_order2", 101)
    assert (order["order_status"], order["cancel_source"], order["refund_status"]) == (
        "CANCELLED",
        "MERCHANT",
        "REFUNDED",
    )
    assert order["refunded_at"] is not None and order["wx_progress_scanned"] == 1
    assert (order["stock_scanned"], order["stock_success"], order["sales_scanned"], order["sales_success"]) == (
        1,
        1,
        1,
        1,
    )
    goods = row(world.db, "goods", 1)
    assert (goods["stock"], goods["sales"]) == (12, 3)
    number = out_refund_no_for(101)
    assert world.emulator.refunds_created[number] == 1
    assert world.emulator.fen_refunded["SO0000000101"] == 1280
    refund = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 101")
    assert len(refund) == 1
    assert (refund[0]["submit_success"], refund[0]["progress_success"], refund[0]["sync_success"]) == (1, 1, 1)
    assert refund[0]["wx_status"] == "SUCCESS" and refund[0]["lease_owner"] is None
    assert events(world, 101) == [
        "CANCELLED",
        "REFUND_SUBMITTED",
        "REFUND_SUCCEEDED",
        "STOCK_RESTORED",
        "SALES_DECREMENTED",
    ]


def test_an_unpaid_order_is_cancelled_without_a_refund_and_its_stock_comes_back(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 102, goods_id=1, quantity=3, paid=False)
    req = request_cancel(world.db, 102, op_type="USER_CANCEL")

    world.settle()

    assert row(world.db, "req_order_ops", req)["result_code"] == "OK"
    order = row(world.db, "goods_order2", 102)
    assert (order["order_status"], order["cancel_source"], order["refund_status"]) == ("CANCELLED", "USER", "NONE")
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order") == 0
    assert sum(world.emulator.refunds_created.values()) == 0
    goods = row(world.db, "goods", 1)
    assert (goods["stock"], goods["sales"]) == (13, 5)
    assert order["sales_scanned"] == 0
    assert events(world, 102) == ["CANCELLED", "STOCK_RESTORED"]


def seed_rejections(db):
    """One order (of goods 1) for each way a cancel request must be refused; returns {request id: expected code}."""
    expected = {}
    add_order(db, 201, status="SHIPPED")
    expected[request_cancel(db, 201)] = "ORDER_SHIPPED"
    add_order(db, 202, status="COMPLETED")
    expected[request_cancel(db, 202)] = "ORDER_SHIPPED"
    add_order(db, 203, deleted=True)
    expected[request_cancel(db, 203)] = "ORDER_DELETED"
    add_order(db, 204, amount=0)
    expected[request_cancel(db, 204)] = "BAD_AMOUNT"
    add_order(db, 205, transaction_id=None)
    expected[request_cancel(db, 205)] = "BAD_AMOUNT"
    add_order(db, 206, status="CANCELLED")
    expected[request_cancel(db, 206)] = "ALREADY_CANCELLED"
    expected[request_cancel(db, 999_999)] = "ORDER_NOT_FOUND"
    add_order(db, 207)
    expected[request_cancel(db, 207, op_type="REFUND_ONLY")] = "UNSUPPORTED_OP"
    add_order(db, 208)
    expected[request_cancel(db, 208)] = "OK"
    expected[request_cancel(db, 208)] = "DUPLICATE_REQUEST"  # same batch
    return expected


def test_every_refused_request_gets_its_stable_code_and_a_readable_message(world):
    add_goods(world.db, 1)
    expected = seed_rejections(world.db)
    world.settle()
    add_order(world.db, 209)
    first = request_cancel(world.db, 209)
    world.settle()
    later = request_cancel(world.db, 209)  # a second batch, after the first was accepted
    world.settle()
    expected.update({first: "OK", later: "DUPLICATE_REQUEST"})

    got = {r["id"]: r for r in rows(world.db, "SELECT * FROM req_order_ops")}
    assert {rid: got[rid]["result_code"] for rid in expected} == expected
    for rid, code in expected.items():
        assert got[rid]["scanned"] == 1 and got[rid]["success"] == (1 if code == "OK" else 0)
        assert got[rid]["result_msg"] and got[rid]["scanned_at"] is not None
    # only the accepted orders were touched
    assert sum(world.emulator.refunds_created.values()) == 2
    assert row(world.db, "goods_order2", 201)["order_status"] == "SHIPPED"


def test_two_hundred_orders_settle_exactly_once_and_a_second_run_changes_nothing(world):
    for goods_id in (1, 2, 3):
        add_goods(world.db, goods_id, stock=1000, sales=1000)
    expected = seed_rejections(world.db)
    paid, unpaid = [], []
    for i in range(190):
        order_id = 1000 + i
        is_paid = i % 4 != 0
        add_order(world.db, order_id, goods_id=1 + i % 3, quantity=1 + i % 5, amount=100 + i, paid=is_paid)
        (paid if is_paid else unpaid).append(order_id)
        request_cancel(world.db, order_id, reason="顾客要求取消 / customer asked")

    world.settle()

    assert pending(world.db) == {}
    for order_id in paid:
        number = out_refund_no_for(order_id)
        assert world.emulator.refunds_created[number] == 1
        assert world.emulator.fen_refunded[f"SO{order_id:010d}"] == 100 + order_id - 1000
        assert events(world, order_id) == [
            "CANCELLED",
            "REFUND_SUBMITTED",
            "REFUND_SUCCEEDED",
            "STOCK_RESTORED",
            "SALES_DECREMENTED",
        ]
    for order_id in unpaid:
        assert events(world, order_id) == ["CANCELLED", "STOCK_RESTORED"]
    assert sum(world.emulator.refunds_created.values()) == len(paid) + 1  # + order 208 from the rejections
    codes = Counter(r["result_code"] for r in rows(world.db, "SELECT result_code FROM req_order_ops"))
    assert codes["OK"] == 191 and sum(codes.values()) == 190 + len(expected)
    for goods_id in (1, 2, 3):
        mine = [1000 + i for i in range(190) if 1 + i % 3 == goods_id]
        qty = {o: 1 + (o - 1000) % 5 for o in mine}
        back = sum(qty.values()) + (1 if goods_id == 1 else 0)  # order 208 is goods 1, quantity 1
        sold = sum(q for o, q in qty.items() if o in paid) + (1 if goods_id == 1 else 0)
        goods = row(world.db, "goods", goods_id)
        assert (goods["stock"], goods["sales"]) == (1000 + back, 1000 - sold)

    before = checksum(world.db)
    world.clock.advance(3600)
    world.runner().run_until_idle(world.clock.now)
    assert checksum(world.db) == before


def paid_and_cancelled(world, order_id):
    """One paid order of goods 1, its cancel requested: the number its refund will carry."""
    add_goods(world.db, 1)
    add_order(world.db, order_id)
    request_cancel(world.db, order_id)
    return out_refund_no_for(order_id)


def test_a_crash_between_the_gateway_answer_and_the_commit_repeats_the_call_with_the_same_number(world):
    number = paid_and_cancelled(world, 301)
    world.runner().run_stage("intake", world.clock.now)

    def crash(stage, ids):
        if stage == "submit_refund":
            raise PowerCut  # the process dies: nothing of it runs after this

    with pytest.raises(PowerCut):
        world.runner(hooks=Hooks(before_commit=crash)).run_stage("submit_refund", world.clock.now)
    refund = rows(world.db, "SELECT * FROM refund_order")[0]
    assert (refund["submit_scanned"], refund["submit_success"]) == (0, 0)
    assert refund["lease_owner"] is not None  # the dead daemon's lease, not yet expired

    world.clock.advance(world.config.job("submit_refund").lease_seconds + 1)
    world.settle()

    assert world.emulator.refunds_created[number] == 1
    assert world.emulator.requests[("POST", 200)] == 2  # the call was repeated, the money moved once
    assert row(world.db, "goods_order2", 301)["refund_status"] == "REFUNDED"


def test_a_lost_answer_is_retried_with_the_same_number_and_never_taken_for_success(world):
    number = paid_and_cancelled(world, 302)
    world.emulator.fail_next(number, "500", after_commit=True)  # WeChat recorded it, then answered 500
    runner = world.runner()
    runner.run_stage("intake", world.clock.now)
    runner.run_stage("submit_refund", world.clock.now)

    refund = refunds(world.db)[302]
    assert (refund["submit_scanned"], refund["attempts"]) == (0, 1)
    assert refund["last_error"].startswith("SYSTEM_ERROR")
    assert refund["next_attempt_at"] > world.clock.now

    world.settle(runner)
    assert world.emulator.refunds_created[number] == 1
    assert rows(world.db, "SELECT out_refund_no FROM refund_order")[0]["out_refund_no"] == number


def test_a_refund_closed_by_wechat_fails_the_order_and_leaves_stock_and_sales_alone(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 303, quantity=2)
    request_cancel(world.db, 303)
    world.emulator.close_refunds_for("SO0000000303")

    world.settle()

    order = row(world.db, "goods_order2", 303)
    assert (order["order_status"], order["refund_status"], order["wx_progress_scanned"]) == ("CANCELLED", "FAILED", 1)
    refund = rows(world.db, "SELECT * FROM refund_order")[0]
    assert (refund["progress_scanned"], refund["progress_success"], refund["wx_status"]) == (1, 0, "CLOSED")
    assert (refund["sync_scanned"], refund["sync_success"]) == (1, 1)
    goods = row(world.db, "goods", 1)
    assert (goods["stock"], goods["sales"]) == (10, 5)
    assert events(world, 303) == ["CANCELLED", "REFUND_SUBMITTED", "REFUND_FAILED"]


def test_a_processing_refund_is_polled_on_schedule_and_an_abnormal_one_waits_for_the_merchant(world):
    add_goods(world.db, 1)
    add_order(world.db, 304)
    add_order(world.db, 305)
    request_cancel(world.db, 304)
    request_cancel(world.db, 305)
    world.emulator.success_delay = 3600
    world.emulator.abnormal_for("SO0000000305")
    runner = world.runner()
    runner.run_until_idle(world.clock.now)
    by_order = refunds(world.db)
    assert by_order[304]["wx_status"] == "PROCESSING"  # submitted, not yet polled
    first_poll = by_order[304]["next_attempt_at"]
    assert (first_poll - world.clock.now).total_seconds() == 1  # poll_delays_seconds[0] in the test config

    world.clock.advance(1)
    runner.run_until_idle(world.clock.now)
    by_order = refunds(world.db)
    assert by_order[304]["progress_scanned"] == 0 and by_order[304]["wx_status"] == "PROCESSING"
    assert by_order[304]["next_attempt_at"] > world.clock.now  # polled, and scheduled again

    world.emulator.success_delay = 0  # the money arrives; 305's card turns out to be frozen
    world.clock.advance(10)
    runner.run_until_idle(world.clock.now)
    by_order = refunds(world.db)
    assert (by_order[304]["progress_scanned"], by_order[304]["progress_success"]) == (1, 1)
    assert by_order[305]["wx_status"] == "ABNORMAL" and by_order[305]["last_error"].startswith("ABNORMAL")
    assert by_order[305]["progress_scanned"] == 0
    assert row(world.db, "goods_order2", 305)["refund_status"] == "REFUNDING"

    world.emulator.resolve_abnormal("SO0000000305")
    world.settle(runner)
    assert {o: row(world.db, "goods_order2", o)["refund_status"] for o in (304, 305)} == {
        304: "REFUNDED",
        305: "REFUNDED",
    }


def test_a_daemon_whose_lease_was_taken_over_drops_its_answer_and_the_new_holder_finishes(world):
    number = paid_and_cancelled(world, 306)
    world.runner().run_stage("intake", world.clock.now)
    lease = world.config.job("submit_refund").lease_seconds

    def stalled_past_the_lease(stage, row, result):
        # While "slow" holds the answer, its lease expires and "fast" takes the row over.
        world.clock.advance(lease + 1)
        with world.db.begin() as conn:
            conn.exec_driver_sql("UPDATE refund_order SET lease_owner = 'fast', lease_until = NULL")

    slow = world.runner(owner="slow", hooks=Hooks(after_gateway_call=stalled_past_the_lease))
    report = slow.run_stage("submit_refund", world.clock.now)
    slow.close()
    assert report.done == 0  # its answer was dropped, not written over the new holder's row
    assert refunds(world.db)[306]["submit_scanned"] == 0

    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE refund_order SET lease_owner = NULL")  # "fast" died too; its lease lapses
    world.settle()
    assert world.emulator.refunds_created[number] == 1
    assert row(world.db, "goods_order2", 306)["refund_status"] == "REFUNDED"


def test_an_operator_requeues_a_refund_that_gave_up_and_it_completes_with_the_same_number(world):
    from cancel_scanner.engine.requeue import requeue

    number = paid_and_cancelled(world, 307)
    world.emulator.fail_next(
        number, "503", times=100, after_commit=True, call="any"
    )  # accepted; every answer lost, queries too
    runner = world.runner()
    runner.run_until_idle(world.clock.now)
    for _ in range(world.config.job("submit_refund").max_attempts):
        world.clock.advance(60)
        runner.run_until_idle(world.clock.now)
    refund = refunds(world.db)[307]
    assert (refund["submit_scanned"], refund["submit_success"]) == (1, 0)
    assert "gave up" in refund["last_error"]
    assert row(world.db, "goods_order2", 307)["refund_status"] == "REFUNDING"  # never guessed

    world.emulator.clear_rules()
    stages = runner.stages
    assert requeue(world.db, stages["submit_refund"], [refund["id"]], world.clock.now, "ops-anna") == 1
    assert requeue(world.db, stages["submit_refund"], [refund["id"]], world.clock.now, "ops-anna") == 0  # pending now
    world.settle(runner)
    assert world.emulator.refunds_created[number] == 1
    assert refunds(world.db)[307]["out_refund_no"] == number
    assert row(world.db, "goods_order2", 307)["refund_status"] == "REFUNDED"
