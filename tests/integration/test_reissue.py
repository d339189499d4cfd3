"""`reissue`: a refund WeChat Pay CLOSED gets a new one with its own number, exactly once.

On SQLite and MariaDB, with the flow's real stages against the emulator over HTTP.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event

from cancel_scanner.engine.status import collect_status
from cancel_scanner.operations.reissue import Refused, Reissued, reissue
from cancel_scanner.scanners import build_stages
from tests.flow import REISSUED_REFUND_EVENTS, add_goods, add_order, request_cancel, row, rows, scalar


def events(world, order_id):
    return [
        r["event"]
        for r in rows(world.db, "SELECT event FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id)
    ]


def closed_order(world, order_id: int = 303, *, goods: bool = True) -> None:
    """A paid order cancelled by its merchant whose refund WeChat closed, with the result written back."""
    if goods:
        add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, order_id, quantity=2)
    request_cancel(world.db, order_id)
    world.emulator.close_refunds_for(f"SO{order_id:010d}")
    world.settle()
    world.emulator.clear_rules()  # WeChat would refund a new number now
    assert row(world.db, "goods_order2", order_id)["refund_status"] == "FAILED"


def test_a_closed_refund_is_reissued_under_a_new_number_and_the_flow_refunds_it_once(world):
    closed_order(world)
    failed_before = {
        s.stage: s.failed for s in collect_status(world.db, build_stages(world.config), world.clock.now).stages
    }
    assert failed_before["poll_refund"] == 1  # the CLOSED refund needs a person

    result = reissue(world.db, 303, now=world.clock.now, by="ops-anna", why="card re-enabled")

    assert isinstance(result, Reissued)
    assert (result.out_refund_no, result.refund_seq, result.replaces) == ("CSR303-2", 2, "CSR303-1")
    order = row(world.db, "goods_order2", 303)
    assert (order["refund_status"], order["wx_progress_scanned"]) == ("REFUNDING", 0)
    world.settle()
    order = row(world.db, "goods_order2", 303)
    assert (order["order_status"], order["refund_status"]) == ("CANCELLED", "REFUNDED")
    assert world.emulator.refunds_created == {"CSR303-1": 1, "CSR303-2": 1}
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (12, 3)
    assert events(world, 303) == [*REISSUED_REFUND_EVENTS, "STOCK_RESTORED", "SALES_DECREMENTED"]
    detail = scalar(world.db, "SELECT detail FROM goods_order2_oplog WHERE event = 'REFUND_REISSUED#2'")
    assert "ops-anna" in detail and "card re-enabled" in detail and "CSR303-1" in detail
    status = collect_status(world.db, build_stages(world.config), world.clock.now)
    assert {s.stage: s.failed for s in status.stages}["poll_refund"] == 0  # reissued: nobody needs to look any more


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("missing", "ORDER_NOT_FOUND"),
        ("no_refund", "NO_REFUND"),
        ("refunded", "NOT_CLOSED"),
        ("live_reissue", "NOT_CLOSED"),
    ],
)
def test_reissue_is_refused_unless_the_last_refund_is_closed(world, setup, code):
    add_goods(world.db, 1)
    if setup == "no_refund":
        add_order(world.db, 303)
    elif setup == "refunded":
        add_order(world.db, 303)
        request_cancel(world.db, 303)
        world.settle()
    elif setup == "live_reissue":
        closed_order(world, goods=False)
        assert isinstance(reissue(world.db, 303, now=world.clock.now, by="a", why="first"), Reissued)
    before = rows(world.db, "SELECT id, out_refund_no, wx_status FROM refund_order ORDER BY id")

    result = reissue(world.db, 303, now=world.clock.now, by="b", why="again")

    assert isinstance(result, Refused) and result.code == code, result
    assert rows(world.db, "SELECT id, out_refund_no, wx_status FROM refund_order ORDER BY id") == before


def test_a_closed_result_not_yet_written_to_the_order_is_not_reissued(world):
    add_goods(world.db, 1)
    add_order(world.db, 303)
    request_cancel(world.db, 303)
    world.emulator.close_refunds_for("SO0000000303")
    runner = world.runner()
    try:
        for _ in range(10):  # up to the poll's CLOSED, before sync_result writes it to the order
            runner.run_until_idle(world.clock.now, stages=["intake", "submit_refund", "poll_refund"])
            if scalar(world.db, "SELECT wx_status FROM refund_order") == "CLOSED":
                break
            world.clock.advance(5)
    finally:
        runner.close()
    result = reissue(world.db, 303, now=world.clock.now, by="b", why="too early")
    assert isinstance(result, Refused) and result.code == "NOT_SYNCED"


def test_a_reissue_that_dies_half_way_leaves_nothing_and_can_be_run_again(world):
    closed_order(world)
    before = (rows(world.db, "SELECT * FROM refund_order"), row(world.db, "goods_order2", 303), events(world, 303))

    def die_on_the_order_update(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("UPDATE GOODS_ORDER2"):
            raise RuntimeError("power cut")

    event.listen(world.db, "before_cursor_execute", die_on_the_order_update)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            reissue(world.db, 303, now=world.clock.now, by="a", why="x")
    finally:
        event.remove(world.db, "before_cursor_execute", die_on_the_order_update)
    assert (
        rows(world.db, "SELECT * FROM refund_order"),
        row(world.db, "goods_order2", 303),
        events(world, 303),
    ) == before
    assert isinstance(reissue(world.db, 303, now=world.clock.now, by="a", why="x"), Reissued)


@pytest.mark.mysql
def test_two_concurrent_reissues_of_one_order_make_exactly_one_new_refund(mysql_db, mysql_url, sandbox):
    """Both start together (a barrier right after each locked the order's row, or tried to): one wins,
    the other waits for its commit and is refused."""
    from tests.flow import World, test_config

    world = World(db=mysql_db, config=test_config(mysql_url), sandbox=sandbox)
    closed_order(world)
    results: list = []
    started = threading.Barrier(2, timeout=10)

    def one(who: str) -> None:
        started.wait()
        results.append(reissue(world.db, 303, now=world.clock.now, by=who, why="race"))

    threads = [threading.Thread(target=one, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(type(r).__name__ for r in results) == ["Refused", "Reissued"]
    (refused,) = [r for r in results if isinstance(r, Refused)]
    assert refused.code in ("NOT_CLOSED", "CONCURRENT_REISSUE")
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE order_id = 303") == 2
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event LIKE 'REFUND_REISSUED%'") == 1
