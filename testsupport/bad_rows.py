"""Rows ready for any stage, and the ways real shops make one of them bad.

Shared by tests/integration/test_bad_rows.py and bench/bad_row.py: orders 1..n (goods i each, stock
and sales 10), cancelled by a merchant and brought to the named stage by running the stages before
it; order ``BAD`` is the one the shop's trigger or constraint is about.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text

from testsupport import shop

BAD = 5  # the bad order's id: in the middle of a batch of 10


@dataclass(frozen=True)
class Case:
    stage: str
    table: str  # the stage's own table
    flag: str  # its scanned/success prefix
    retry: str  # its attempts/last_error prefix
    event: str | None  # the oplog event it writes for an order
    trigger: tuple[str, str, str]  # (table, INSERT|UPDATE, condition on NEW/OLD) the shop refuses
    check: tuple[str, str]  # (table, CHECK condition) MariaDB refuses
    fact: str | None  # what WeChat did, kept when the write-back here fails


def _cases(bad: int) -> dict[str, Case]:
    status_of_bad = f"OLD.id = {bad} AND NEW.order_status <> OLD.order_status"
    # A CHECK may not name an AUTO_INCREMENT column: the bad order by its number, its goods by name.
    order, goods = f"order_no <> '{shop.order_row(bad)['no']}'", f"name <> '{shop.goods_row(bad)['name']}'"
    return {
        "intake": Case(
            "intake",
            "req_order_ops",
            "",
            "",
            "CANCELLED",
            ("goods_order2", "UPDATE", status_of_bad),
            ("goods_order2", f"{order} OR order_status <> 'CANCELLED'"),
            None,
        ),
        "close_unpaid": Case(
            "close_unpaid",
            "goods_order2",
            "close",
            "close",
            "PAYMENT_CLOSED",
            ("goods_order2", "UPDATE", status_of_bad),
            ("goods_order2", f"{order} OR order_status <> 'CANCELLED'"),
            "PAYMENT_CLOSED",
        ),
        "submit_refund": Case(
            "submit_refund",
            "refund_order",
            "submit",
            "",
            "REFUND_SUBMITTED",
            ("goods_order2_oplog", "INSERT", f"NEW.order_id = {bad} AND NEW.event = 'REFUND_SUBMITTED'"),
            ("refund_order", f"order_id <> {bad} OR wx_refund_id IS NULL"),
            "REFUND_ACCEPTED",
        ),
        "poll_refund": Case(
            "poll_refund",
            "refund_order",
            "progress",
            "",
            None,
            ("refund_order", "UPDATE", f"OLD.order_id = {bad} AND NEW.wx_status = 'SUCCESS'"),
            ("refund_order", f"order_id <> {bad} OR wx_status <> 'SUCCESS'"),
            "REFUND_SUCCESS",
        ),
        "sync_result": Case(
            "sync_result",
            "refund_order",
            "sync",
            "",
            "REFUND_SUCCEEDED",
            ("goods_order2", "UPDATE", f"OLD.id = {bad} AND NEW.refund_status <> OLD.refund_status"),
            ("goods_order2", f"{order} OR refund_status <> 'REFUNDED'"),
            None,
        ),
        "restore_stock": Case(
            "restore_stock",
            "goods_order2",
            "stock",
            "stock",
            "STOCK_RESTORED",
            ("goods", "UPDATE", f"OLD.id = {bad} AND NEW.stock <> OLD.stock"),
            ("goods", f"{goods} OR stock <= 10"),
            None,
        ),
        "decrement_sales": Case(
            "decrement_sales",
            "goods_order2",
            "sales",
            "sales",
            "SALES_DECREMENTED",
            ("goods", "UPDATE", f"OLD.id = {bad} AND NEW.sales <> OLD.sales"),
            ("goods", f"{goods} OR sales >= 10"),
            None,
        ),
    }


CASES = _cases(BAD)
STAGES_BEFORE = {
    "intake": [],
    "close_unpaid": ["intake"],
    "submit_refund": ["intake"],
    "poll_refund": ["intake", "submit_refund"],
    "sync_result": ["intake", "submit_refund", "poll_refund"],
    "restore_stock": ["intake", "submit_refund", "poll_refund", "sync_result"],
    "decrement_sales": ["intake", "submit_refund", "poll_refund", "sync_result"],
}


def orders_ready_for(
    db: Engine,
    emulator: Any,
    runner: Any,
    clock: Any,
    stage: str,
    order_ids: Sequence[int],
    goods_for: Callable[[int], int] = lambda order_id: order_id,
    level: int = 10,
) -> dict[int, int]:
    """Orders ``order_ids`` (of goods ``goods_for(order_id)``, stock and sales ``level`` each) cancelled and
    brought to ``stage`` (paid ones; unpaid for close_unpaid, their trades NOTPAY at the emulator); the
    stage's row id by order id. ``clock`` is moved on past each stage's first delay."""
    unpaid = stage == "close_unpaid"
    shop.insert_goods_rows(
        db, [shop.goods_row(g, stock=level, sales=level) for g in sorted({goods_for(i) for i in order_ids})]
    )
    orders = [
        shop.order_row(
            i,
            goods_id=goods_for(i),
            quantity=2,
            amount=500 if unpaid else 1280,
            paid=not unpaid,
            now=clock.now,
            created_at=clock.now - timedelta(minutes=10) if unpaid else None,
        )
        for i in order_ids
    ]
    shop.insert_orders(db, orders)
    if unpaid:
        for o in orders:
            emulator.create_trade(o["no"], 500)
    shop.insert_requests(db, [(i, "MERCHANT_CANCEL", "clerk-1", "out of stock") for i in order_ids])
    for name in STAGES_BEFORE[stage]:
        clock.advance(3)  # past poll_refund's first delay in the tests' jobs
        runner.run_until_idle(clock.now, stages=[name])
    clock.advance(3)
    with db.connect() as conn:
        if stage == "intake":
            found = conn.execute(text("SELECT order_id, id FROM req_order_ops")).all()
        elif stage in ("submit_refund", "poll_refund", "sync_result"):
            found = conn.execute(text("SELECT order_id, id FROM refund_order")).all()
        else:
            found = [(i, i) for i in order_ids]
    return {order_id: row_id for order_id, row_id in found}


def shop_trigger(db: Engine, table: str, on: str, condition: str, *, message: str) -> None:
    """A shop's rule, as shops write them: a BEFORE trigger that refuses the change (SIGNAL; RAISE on SQLite)."""
    with db.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER shop_rule BEFORE {on} ON {table} FOR EACH ROW WHEN {condition}"
                f" BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE TRIGGER shop_rule BEFORE {on} ON {table} FOR EACH ROW BEGIN IF {condition} THEN"
                f" SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'; END IF; END"
            )


def drop_shop_trigger(db: Engine) -> None:
    with db.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER shop_rule")
