"""Partial cancels (issue 26): a request naming a quantity refunds those units' share, gives them back to
stock, takes them off sales, and the order goes on; the request for the last units cancels the order.

On SQLite and MariaDB, over real HTTP to the emulator."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import insert

from cancel_scanner.models import refund_order
from cancel_scanner.scanners.intake import out_refund_no_for, refund_row
from cancel_scanner.scanners.parts import MAX_REFUNDS_PER_PAYMENT
from tests.flow import T0, add_goods, add_order, request_cancel, row, rows


def events(world, order_id):
    return [
        r["event"]
        for r in rows(world.db, "SELECT event FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id)
    ]


def seconds_between(earlier, later) -> float:
    """Two DATETIME(3) values as the driver returns them (SQLite: text)."""
    return (datetime.fromisoformat(str(later)) - datetime.fromisoformat(str(earlier))).total_seconds()


def finished_parts(db, order_id: int, n: int) -> None:
    """``n`` one-unit parts of 100 fen of an order paid 6000, refunded and settled, as the flow leaves them."""
    done = ("submit", "progress", "sync", "goods")
    with db.begin() as conn:
        conn.execute(
            insert(refund_order),
            [
                {
                    **refund_row(
                        order_id,
                        f"SO{order_id:010d}",
                        f"4200{order_id:012d}",
                        100,
                        "r",
                        T0,
                        seq=seq,
                        total=6000,
                        quantity=1,
                    ),
                    "part": 1,
                    "wx_status": "SUCCESS",
                    **{f"{flag}_{half}": 1 for flag in done for half in ("scanned", "success")},
                }
                for seq in range(1, n + 1)
            ],
        )


def answer(world, req_id):
    request = row(world.db, "req_order_ops", req_id)
    return request["result_code"], request["result_msg"]


def test_three_parts_refund_333_333_and_334_fen_and_only_the_last_cancels_the_order(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 7, goods_id=1, quantity=3, amount=1000)

    first = request_cancel(world.db, 7, quantity=1)
    world.settle()
    code, message = answer(world, first)
    assert code == "OK" and "1 unit(s) cancelled, 2 left to ship" in message and "333 fen" in message
    order = row(world.db, "goods_order2", 7)
    assert (order["order_status"], order["refund_status"]) == ("PAID", "NONE")  # it ships with the other two
    assert (order["cancelled_quantity"], order["parts_quantity"], order["refunded_amount"]) == (1, 1, 333)
    goods = row(world.db, "goods", 1)
    assert (goods["stock"], goods["sales"]) == (11, 4)
    assert world.emulator.fen_refunded[order["order_no"]] == 333

    second = request_cancel(world.db, 7, quantity=1)
    world.settle()
    assert answer(world, second)[0] == "OK"
    last = request_cancel(world.db, 7)  # NULL: every unit left
    world.settle()
    code, message = answer(world, last)
    assert code == "OK" and "334 fen" in message

    order = row(world.db, "goods_order2", 7)
    assert (order["order_status"], order["refund_status"]) == ("CANCELLED", "REFUNDED")
    assert (order["cancelled_quantity"], order["parts_quantity"], order["refunded_amount"]) == (3, 2, 1000)
    goods = row(world.db, "goods", 1)
    assert (goods["stock"], goods["sales"]) == (13, 2)  # each unit back once: two by their parts, one by the order
    assert world.emulator.fen_refunded[order["order_no"]] == 1000  # exactly what was paid
    refunds = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 7 ORDER BY refund_seq")
    assert [(r["refund_seq"], r["part"], r["quantity"], r["refund_amount"], r["total_amount"]) for r in refunds] == [
        (1, 1, 1, 333, 1000),
        (2, 1, 1, 333, 1000),
        (3, 0, 1, 334, 1000),
    ]
    assert [world.emulator.refunds_created[out_refund_no_for(7, seq)] for seq in (1, 2, 3)] == [1, 1, 1]
    assert [(r["goods_scanned"], r["goods_success"]) for r in refunds] == [(1, 1), (1, 1), (0, 0)]
    assert events(world, 7) == [
        "PART_CANCELLED#1",
        "REFUND_SUBMITTED",
        "REFUND_SUCCEEDED",
        "PART_STOCK_RESTORED#1",
        "PART_SALES_DECREMENTED#1",
        "PART_CANCELLED#2",
        "REFUND_SUBMITTED#2",
        "REFUND_SUCCEEDED#2",
        "PART_STOCK_RESTORED#2",
        "PART_SALES_DECREMENTED#2",
        "CANCELLED",
        "REFUND_SUBMITTED#3",
        "REFUND_SUCCEEDED#3",
        "STOCK_RESTORED",
        "SALES_DECREMENTED",
    ]


def test_a_quantity_naming_every_unit_is_a_whole_cancel_as_before(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 8, goods_id=1, quantity=2, amount=1280)
    req = request_cancel(world.db, 8, quantity=2)
    world.settle()
    assert answer(world, req)[0] == "OK"
    order = row(world.db, "goods_order2", 8)
    assert (order["order_status"], order["refund_status"], order["refunded_amount"]) == ("CANCELLED", "REFUNDED", 1280)
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (12, 3)
    assert events(world, 8)[0] == "CANCELLED"


def test_every_request_a_part_cannot_honour_gets_its_own_code_and_nothing_moves(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 1, goods_id=1, quantity=3, amount=900)
    add_order(world.db, 2, goods_id=1, quantity=3, amount=900, paid=False)
    add_order(world.db, 3, goods_id=1, quantity=3, amount=900, status="SHIPPED")
    add_order(world.db, 4, goods_id=1, quantity=3, amount=2)  # 2 fen for 3 units: the first unit's share is 0
    asked = {
        "zero": request_cancel(world.db, 1, quantity=0),
        "negative": request_cancel(world.db, 1, quantity=-2),
        "too_many": request_cancel(world.db, 1, quantity=4),
        "unpaid_part": request_cancel(world.db, 2, quantity=1),
        "shipped_part": request_cancel(world.db, 3, quantity=1),
        "zero_fen": request_cancel(world.db, 4, quantity=1),
    }
    world.settle()
    codes = {what: answer(world, req) for what, req in asked.items()}
    assert {what: code for what, (code, _) in codes.items()} == {
        "zero": "BAD_QUANTITY",
        "negative": "BAD_QUANTITY",
        "too_many": "QUANTITY_EXCEEDS_REMAINING",
        "unpaid_part": "PARTIAL_UNPAID",
        "shipped_part": "ORDER_SHIPPED",
        "zero_fen": "PART_AMOUNT_ZERO",
    }
    assert "(3 of 3 left)" in codes["too_many"][1]
    assert all(message and len(message.encode()) <= 255 for _, message in codes.values())
    assert rows(world.db, "SELECT COUNT(*) AS n FROM refund_order")[0]["n"] == 0
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (10, 5)
    assert [row(world.db, "goods_order2", i)["cancelled_quantity"] for i in (1, 2, 3, 4)] == [0, 0, 0, 0]
    assert world.emulator.fen_refunded == {} or sum(world.emulator.fen_refunded.values()) == 0


def test_the_fifty_first_refund_of_a_payment_is_refused_at_intake(world):
    add_goods(world.db, 1)
    add_order(world.db, 9, goods_id=1, quantity=60, amount=6000)
    finished_parts(world.db, 9, MAX_REFUNDS_PER_PAYMENT)  # fifty refunds already made, as the flow leaves them
    req = request_cancel(world.db, 9, quantity=1)
    world.settle()
    assert answer(world, req)[0] == "TOO_MANY_REFUNDS"
    assert (
        rows(world.db, "SELECT COUNT(*) AS n FROM refund_order WHERE order_id = 9")[0]["n"] == MAX_REFUNDS_PER_PAYMENT
    )


def test_two_requests_for_the_last_units_in_one_batch_give_one_acceptance_and_one_refusal(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 5, goods_id=1, quantity=2, amount=1000)
    first = request_cancel(world.db, 5, quantity=1)
    world.settle()
    a = request_cancel(world.db, 5, quantity=1)
    b = request_cancel(world.db, 5, quantity=1)
    world.settle()
    assert [answer(world, r)[0] for r in (first, a, b)] == ["OK", "OK", "DUPLICATE_REQUEST"]
    order = row(world.db, "goods_order2", 5)
    assert (order["order_status"], order["cancelled_quantity"], order["refunded_amount"]) == ("CANCELLED", 2, 1000)
    assert world.emulator.fen_refunded[order["order_no"]] == 1000


@pytest.mark.parametrize("units", [1, 2])
def test_a_part_refund_closed_by_wechat_moves_no_units_and_leaves_the_order_going(world, units):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 6, goods_id=1, quantity=3, amount=900)
    world.emulator.close_refunds_for(out_refund_no_for(6, 1))
    req = request_cancel(world.db, 6, quantity=units)
    world.settle()
    assert answer(world, req)[0] == "OK"
    order = row(world.db, "goods_order2", 6)
    assert (order["order_status"], order["refund_status"], order["refunded_amount"]) == ("PAID", "NONE", 0)
    assert order["cancelled_quantity"] == units  # cancelled, waiting for a person: reissue the part
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (10, 5)
    refund = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 6")[0]
    assert (refund["wx_status"], refund["goods_scanned"]) == ("CLOSED", 0)
    assert "REFUND_FAILED" in events(world, 6)


def test_two_parts_asked_together_go_to_wechat_a_minute_apart_and_the_second_waits_without_failing(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 11, goods_id=1, quantity=4, amount=1000)
    first = request_cancel(world.db, 11, quantity=1)
    world.runner().run_stage("intake", world.clock.now)  # the first part is accepted ...
    second = request_cancel(world.db, 11, quantity=1)
    world.runner().run_stage("intake", world.clock.now)  # ... and the second, before either is sent
    assert [answer(world, r)[0] for r in (first, second)] == ["OK", "OK"]

    world.settle(step_seconds=5)

    refunds = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 11 ORDER BY refund_seq")
    gap = seconds_between(refunds[0]["applied_at"], refunds[1]["applied_at"])
    assert 60 <= gap <= 70  # its turn, not later than one step of the clock past it
    assert [r["attempts"] for r in refunds] == [0, 0]  # waiting is not failing
    assert [r["wx_status"] for r in refunds] == ["SUCCESS", "SUCCESS"]
    assert world.emulator.fen_refunded["SO0000000011"] == 500
    assert not any(status == 429 for (_, status) in world.emulator.requests)


def test_a_retry_of_a_number_already_sent_never_waits_for_the_spacing(world):
    add_goods(world.db, 1)
    add_order(world.db, 12, goods_id=1, quantity=4, amount=1000)
    request_cancel(world.db, 12, quantity=1)
    request_cancel(world.db, 12, quantity=1)
    world.emulator.fail_next(out_refund_no_for(12, 1), "500", after_commit=True)  # accepted, but we hear 500
    world.settle(step_seconds=5)
    refunds = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 12 ORDER BY refund_seq")
    assert [world.emulator.refunds_created[out_refund_no_for(12, s)] for s in (1, 2)] == [1, 1]
    assert seconds_between(refunds[0]["applied_at"], refunds[1]["applied_at"]) >= 60
    assert [r["wx_status"] for r in refunds] == ["SUCCESS", "SUCCESS"]


def test_a_closed_part_is_reissued_for_the_same_units_and_amount_and_the_order_goes_on(world):
    from cancel_scanner.operations.reissue import Reissued, reissue

    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 13, goods_id=1, quantity=3, amount=900)
    world.emulator.close_refunds_for(out_refund_no_for(13, 1))
    request_cancel(world.db, 13, quantity=2)
    world.settle()
    assert rows(world.db, "SELECT wx_status FROM refund_order WHERE order_id = 13")[0]["wx_status"] == "CLOSED"

    done = reissue(world.db, 13, now=world.clock.now, by="ops", why="closed")
    assert isinstance(done, Reissued) and done.out_refund_no == out_refund_no_for(13, 2)
    again = reissue(world.db, 13, now=world.clock.now, by="ops", why="twice")
    assert again.code == "NOT_CLOSED"  # the new one is live: nothing to reissue
    world.settle()

    order = row(world.db, "goods_order2", 13)
    assert (order["order_status"], order["refund_status"], order["refunded_amount"]) == ("PAID", "NONE", 600)
    new = rows(world.db, "SELECT * FROM refund_order WHERE order_id = 13 AND refund_seq = 2")[0]
    assert (new["part"], new["quantity"], new["refund_amount"], new["total_amount"]) == (1, 2, 600, 900)
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (12, 3)
    assert world.emulator.fen_refunded[order["order_no"]] == 600


def test_prune_archives_settled_parts_only_and_the_next_part_is_numbered_after_them(world):
    from datetime import timedelta

    from cancel_scanner.operations.prune import prune

    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 14, goods_id=1, quantity=4, amount=1000)
    request_cancel(world.db, 14, quantity=1)
    world.settle()
    # a second part whose refund succeeded but whose units part_goods has not moved yet
    request_cancel(world.db, 14, quantity=1)
    world.settle()
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE refund_order SET goods_scanned = 0, goods_success = 0 WHERE refund_seq = 2")
    later = world.clock.advance(40 * 86400)
    prune(world.db, older_than=timedelta(days=30), batch_size=10, now=later)
    live = [r["refund_seq"] for r in rows(world.db, "SELECT refund_seq FROM refund_order WHERE order_id = 14")]
    archived = [
        r["refund_seq"] for r in rows(world.db, "SELECT refund_seq FROM refund_order_archive WHERE order_id = 14")
    ]
    assert live == [1, 2] and archived == []  # the order has a part not finished: all of its refunds stay
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE refund_order SET goods_scanned = 1, goods_success = 1 WHERE refund_seq = 2")
    prune(world.db, older_than=timedelta(days=30), batch_size=10, now=world.clock.advance(40 * 86400))
    archived = [
        r["refund_seq"] for r in rows(world.db, "SELECT refund_seq FROM refund_order_archive WHERE order_id = 14")
    ]
    assert sorted(archived) == [1, 2]

    third = request_cancel(world.db, 14, quantity=1)
    world.settle()
    assert answer(world, third)[0] == "OK"
    (new,) = rows(world.db, "SELECT refund_seq, out_refund_no FROM refund_order WHERE order_id = 14")
    assert (new["refund_seq"], new["out_refund_no"]) == (3, out_refund_no_for(14, 3))
    assert world.emulator.refunds_created[out_refund_no_for(14, 3)] == 1
    assert world.emulator.fen_refunded["SO0000000014"] == 750


def test_a_part_reissued_once_is_never_reissued_again_even_after_its_closed_refund_is_requeued(world):
    from cancel_scanner.engine.requeue import requeue
    from cancel_scanner.operations.reissue import Refused, reissue
    from cancel_scanner.scanners import build_stages

    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 15, goods_id=1, quantity=3, amount=1000)
    world.emulator.close_refunds_for(out_refund_no_for(15, 1))
    request_cancel(world.db, 15, quantity=1)
    world.settle()
    reissue(world.db, 15, now=world.clock.now, by="ops", why="closed")
    world.settle()
    closed = rows(world.db, "SELECT id FROM refund_order WHERE order_id = 15 AND refund_seq = 1")[0]["id"]
    # an operator gives the CLOSED refund "another go": it is CLOSED again, and its REISSUED note is gone
    requeue(world.db, build_stages(world.config)["poll_refund"], [closed], world.clock.now, "ops")
    world.settle()
    again = reissue(world.db, 15, now=world.clock.now, by="ops", why="twice")
    assert isinstance(again, Refused) and again.code == "NOT_CLOSED"
    assert rows(world.db, "SELECT COUNT(*) AS n FROM refund_order WHERE order_id = 15")[0]["n"] == 2
    assert world.emulator.fen_refunded["SO0000000015"] == 333  # one unit paid back once
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (11, 4)


def test_parts_leave_wechats_fiftieth_refund_for_the_rest_of_the_order(world):
    add_goods(world.db, 1)
    add_order(world.db, 16, goods_id=1, quantity=60, amount=6000)
    finished_parts(world.db, 16, MAX_REFUNDS_PER_PAYMENT - 1)  # 49
    with world.db.begin() as conn:
        conn.exec_driver_sql("UPDATE goods_order2 SET cancelled_quantity = 49, parts_quantity = 49 WHERE id = 16")
    part = request_cancel(world.db, 16, quantity=1)
    world.settle()
    assert answer(world, part)[0] == "TOO_MANY_REFUNDS"  # a 50th part would leave the rest uncancellable
    rest = request_cancel(world.db, 16)
    world.settle()
    assert answer(world, rest)[0] == "OK"
    order = row(world.db, "goods_order2", 16)
    assert (order["order_status"], order["cancelled_quantity"]) == ("CANCELLED", 60)
    assert world.emulator.fen_refunded["SO0000000016"] == 6000 - 4900  # the rest: 11 units of 100 fen


def test_a_shop_that_lowered_quantity_below_the_parts_fails_that_order_only(world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 17, goods_id=1, quantity=3, amount=900)
    add_order(world.db, 18, goods_id=1, quantity=2, amount=900)
    request_cancel(world.db, 17, quantity=2)
    world.settle()
    request_cancel(world.db, 17)
    request_cancel(world.db, 18)
    world.runner().run_stage("intake", world.clock.now)  # both cancels accepted ...
    with world.db.begin() as conn:  # the shop rewrites the order meanwhile: 1 unit, though 2 were cancelled in part
        conn.exec_driver_sql("UPDATE goods_order2 SET quantity = 1 WHERE id = 17")
    world.settle()
    assert row(world.db, "goods_order2", 17)["stock_last_error"].startswith("QUANTITY_BELOW_PARTS")
    assert (row(world.db, "goods_order2", 18)["stock_success"], row(world.db, "goods_order2", 18)["sales_success"]) == (
        1,
        1,
    )
