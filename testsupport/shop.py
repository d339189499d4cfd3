"""The shop's rows, written as the shop writes them: plain SQL, only the columns its systems fill.

An order as the shop's own order system inserts it (no flag columns), goods, and a cancel request
as a merchant's tool inserts it (four columns, nothing else). tests/flow.py and the acceptance
harness both write through these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

INSERT_GOODS = text("INSERT INTO goods (id, name, stock, sales) VALUES (:id, :name, :stock, :sales)")
INSERT_ORDER = text(
    "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount,"
    " pay_status, transaction_id, paid_at, order_status, is_deleted, created_at)"
    " VALUES (:id, :no, 7, 9, :goods, :qty, :amount, :pay, :txn, :paid_at, :status, :deleted, :created_at)"
)
# Orders are placed this long before ``now``: old enough for close_unpaid to close (5 minutes),
# younger than its payment timeout (30 minutes), so no unpaid order closes unless a test says so.
ORDER_AGE = timedelta(minutes=10)
INSERT_REQUEST = text("INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES (:o, :t, :op, :r)")
INSERT_PART_REQUEST = text(
    "INSERT INTO req_order_ops (order_id, op_type, operator, reason, quantity) VALUES (:o, :t, :op, :r, :q)"
)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def goods_row(goods_id: int, *, stock: int = 100, sales: int = 50, name: str | None = None) -> dict[str, Any]:
    return {"id": goods_id, "name": name or f"goods {goods_id}", "stock": stock, "sales": sales}


def insert_goods_rows(db: Engine, rows: Iterable[Mapping[str, Any]]) -> None:
    """Goods rows as ``goods_row`` makes them."""
    with db.begin() as conn:
        conn.execute(INSERT_GOODS, [dict(r) for r in rows])


def insert_goods(db: Engine, goods: Mapping[int, tuple[int, int]]) -> None:
    """Goods by id -> (stock, sales), named as ``goods_row`` names them."""
    insert_goods_rows(db, [goods_row(i, stock=stock, sales=sales) for i, (stock, sales) in goods.items()])


def order_row(
    order_id: int,
    *,
    goods_id: int = 1,
    quantity: int = 1,
    amount: int = 1280,
    paid: bool = True,
    status: str | None = None,
    transaction_id: str | None | bool = True,
    paid_at: datetime | None = None,
    deleted: bool = False,
    now: datetime | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """One order as the shop's own order system inserts it: no flag columns.

    ``transaction_id=True`` makes one up for a paid order; ``paid_at`` defaults to a day before
    ``now`` (the wall clock unless given) for a paid order.
    """
    if transaction_id is True:
        transaction_id = f"4200{order_id:012d}" if paid else None
    return {
        "id": order_id,
        "no": f"SO{order_id:010d}",
        "goods": goods_id,
        "qty": quantity,
        "amount": amount,
        "pay": 1 if paid else 0,
        "txn": transaction_id,
        "paid_at": paid_at or ((now or utcnow()) - timedelta(days=1) if paid else None),
        "status": status or ("PAID" if paid else "UNPAID"),
        "deleted": 1 if deleted else 0,
        "created_at": created_at or (now or utcnow()) - ORDER_AGE,
    }


def insert_orders(db: Engine, orders: Iterable[Mapping[str, Any]]) -> None:
    """Orders as ``order_row`` makes them."""
    rows = list(orders)
    with db.begin() as conn:
        conn.execute(INSERT_ORDER, rows)


def request_row(
    order_id: int,
    op_type: str = "MERCHANT_CANCEL",
    operator: str | None = "clerk-1",
    reason: str | None = "out of stock",
) -> dict[str, Any]:
    return {"o": order_id, "t": op_type, "op": operator, "r": reason}


def insert_requests(db: Engine, requests: Iterable[tuple[int, str, str | None, str | None]]) -> None:
    """What merchants' tools do: (order_id, op_type, operator, reason), four columns and nothing else."""
    rows = [request_row(o, t, op, r) for o, t, op, r in requests]
    if not rows:
        return
    with db.begin() as conn:
        conn.execute(INSERT_REQUEST, rows)


def request_cancel(
    db: Engine,
    order_id: int,
    op_type: str = "MERCHANT_CANCEL",
    operator: str | None = "clerk-1",
    reason: str | None = "out of stock",
    quantity: int | None = None,
) -> int:
    """One merchant's cancel request; its id. ``quantity``: a tool of schema 8 that names the units (a fifth column)."""
    with db.begin() as conn:
        if quantity is None:
            return conn.execute(INSERT_REQUEST, request_row(order_id, op_type, operator, reason)).lastrowid
        return conn.execute(
            INSERT_PART_REQUEST, {**request_row(order_id, op_type, operator, reason), "q": quantity}
        ).lastrowid
