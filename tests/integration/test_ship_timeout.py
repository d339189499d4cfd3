"""Orders nobody ships (issue 26, item 6): with jobs.intake.ship_timeout_hours, a PAID order not shipped
that long after payment becomes a cancel request of its own, once, and is cancelled and refunded; the
ship_due figure counts the orders within ship_warn_hours of their timeout."""

from __future__ import annotations

import threading
from datetime import timedelta

from cancel_scanner.engine.status import collect_status
from cancel_scanner.operations.ship_timeout import request_cancels
from cancel_scanner.scanners import build_stages
from cancel_scanner.scanners.ship_timeout import SHIP_TIMEOUT_OP
from tests.flow import T0, World, add_goods, add_order, request_cancel, row, rows, test_config

TIMEOUT, WARN = 72, 12


def shipping_world(world) -> World:
    config = test_config(
        world.config.database_url, jobs={"intake": {"ship_timeout_hours": TIMEOUT, "ship_warn_hours": WARN}}
    )
    return World(db=world.db, config=config, sandbox=world.sandbox, clock=world.clock)


def paid(hours: float):
    return T0 - timedelta(hours=hours)


def seed(db) -> None:
    add_goods(db, 1, stock=10, sales=5)
    add_order(db, 1, goods_id=1, quantity=2, amount=1000, paid_at=paid(80))  # past its timeout
    add_order(db, 2, goods_id=1, quantity=1, amount=500, paid_at=paid(65))  # within the warning
    add_order(db, 3, goods_id=1, quantity=1, amount=500, paid_at=paid(10))  # young
    add_order(db, 4, goods_id=1, quantity=1, amount=500, paid_at=paid(100), status="SHIPPED")
    add_order(db, 5, goods_id=1, quantity=1, amount=500, paid_at=paid(100))  # a merchant's request is pending
    add_order(db, 6, goods_id=1, quantity=1, amount=500, paid_at=paid(100), deleted=True)
    add_order(db, 7, goods_id=1, quantity=3, amount=900, paid_at=paid(100))  # one unit cancelled already


def ship_due(w: World) -> int:
    return collect_status(w.db, build_stages(w.config), w.clock.now).count("ship_due")


def test_an_order_not_shipped_in_time_is_cancelled_and_refunded_once_and_the_others_are_left_alone(world):
    w = shipping_world(world)
    seed(w.db)
    request_cancel(w.db, 7, quantity=1)
    w.settle()
    request_cancel(w.db, 5)  # pending: the ship timeout leaves this order to the merchant's request
    assert ship_due(w) == 3  # 1, 2 and 7; not 3 (young), 4 (shipped), 5 (asked), 6 (deleted)

    assert request_cancels(w.db, w.clock.now, TIMEOUT) == 2
    assert request_cancels(w.db, w.clock.now, TIMEOUT) == 0  # once
    asked = rows(
        w.db, "SELECT order_id, operator FROM req_order_ops WHERE op_type = :t ORDER BY order_id", t=SHIP_TIMEOUT_OP
    )
    assert [(r["order_id"], r["operator"]) for r in asked] == [(1, "ship_timeout"), (7, "ship_timeout")]
    assert ship_due(w) == 1  # order 2 still warns

    w.settle()
    for order_id, refunded in ((1, 1000), (7, 900)):
        order = row(w.db, "goods_order2", order_id)
        assert (order["order_status"], order["cancel_source"], order["refund_status"]) == (
            "CANCELLED",
            "SHIP_TIMEOUT",
            "REFUNDED",
        )
        assert order["refunded_amount"] == refunded
        assert w.emulator.fen_refunded[order["order_no"]] == refunded
    assert [row(w.db, "goods_order2", i)["order_status"] for i in (2, 3, 4, 6)] == ["PAID", "PAID", "SHIPPED", "PAID"]
    assert row(w.db, "goods_order2", 5)["cancel_source"] == "MERCHANT"


def test_two_daemons_looking_at_once_ask_once_per_order(world):
    w = shipping_world(world)
    add_goods(w.db, 1)
    for order_id in range(1, 201):
        add_order(w.db, order_id, goods_id=1, paid_at=paid(80))
    counts: list[int] = []
    start = threading.Barrier(2)

    def look() -> None:
        start.wait(timeout=10)
        counts.append(request_cancels(w.db, w.clock.now, TIMEOUT, batch=20))

    threads = [threading.Thread(target=look) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(counts) == 200
    per_order = rows(w.db, "SELECT order_id, COUNT(*) AS n FROM req_order_ops GROUP BY order_id HAVING COUNT(*) > 1")
    assert per_order == []


def test_off_by_default_nothing_is_counted_or_asked(world):
    seed(world.db)
    assert collect_status(world.db, build_stages(world.config), world.clock.now).count("ship_due") == 0
    assert "ship_due" not in {
        key for key, _label, _n in collect_status(world.db, build_stages(world.config), T0).counts
    }


def test_the_daemon_runs_it_at_start_and_every_few_minutes_only_when_it_is_configured(world):
    from types import SimpleNamespace

    from cancel_scanner.operations.daily import jobs
    from cancel_scanner.operations.ship_timeout import CHECK_EVERY_SECONDS

    w = shipping_world(world)
    seed(w.db)
    off = SimpleNamespace(config=world.config, db=world.db, runner=SimpleNamespace(clock=world.clock))
    assert "ship_timeout" not in [job.name for job in jobs(off)]  # off by default

    app = SimpleNamespace(config=w.config, db=w.db, runner=SimpleNamespace(clock=w.clock))
    (job,) = [job for job in jobs(app) if job.name == "ship_timeout"]
    assert job.catch_up  # once right after the daemon starts
    assert job.run() == CHECK_EVERY_SECONDS  # and again this long after
    asked = rows(w.db, "SELECT order_id FROM req_order_ops WHERE op_type = :t ORDER BY order_id", t=SHIP_TIMEOUT_OP)
    assert [r["order_id"] for r in asked] == [1, 5, 7]  # 5 has no request of its own in this test
