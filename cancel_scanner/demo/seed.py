"""Seeding the shop's rows as its own systems would: plain SQL, only the columns they write."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import Engine, text

from cancel_scanner.demo.plan import Plan, Request


def _sql_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed_shop(db: Engine, plan: Plan, now: datetime) -> None:
    rng = random.Random(plan.seed + 1)
    with db.begin() as conn:
        conn.execute(
            text("INSERT INTO goods (id, name, stock, sales) VALUES (:id, :name, :stock, :sales)"),
            [{"id": g.id, "name": g.name, "stock": g.stock, "sales": g.sales} for g in plan.goods],
        )
        conn.execute(
            text(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount,"
                " pay_status, transaction_id, paid_at, order_status, is_deleted, created_at)"
                " VALUES (:id, :no, :user, 9, :goods, :qty, :amount, :pay, :txn, :paid_at, :status, :deleted, :created)"
            ),
            [
                {
                    "id": o.id,
                    "no": o.order_no,
                    "user": rng.randint(10_000, 99_999),
                    "goods": o.goods_id,
                    "qty": o.quantity,
                    "amount": o.amount,
                    "pay": 1 if o.paid else 0,
                    "txn": f"4200000{o.id:012d}" if o.paid else None,
                    "paid_at": _sql_time(now - timedelta(hours=rng.uniform(1, 72))) if o.paid else None,
                    "status": {"shipped": "SHIPPED", "completed": "COMPLETED", "cancelled_before": "CANCELLED"}.get(
                        o.kind, "PAID" if o.paid else "UNPAID"
                    ),
                    "deleted": 1 if o.kind == "deleted" else 0,
                    # Placed 6 to 25 minutes ago: old enough to close its payment (5 minutes),
                    # younger than the payment timeout (30), so only the cancels asked for close.
                    "created": _sql_time(now - timedelta(minutes=rng.uniform(6, 25))),
                }
                for o in plan.orders
            ],
        )
        # The user cancelled this one in the app yesterday and the scanner handled it then:
        # history, so today's request for it is the one that must be turned away.
        conn.execute(
            text(
                "UPDATE goods_order2 SET cancel_source = 'USER', cancelled_at = :at, stock_scanned = 1, stock_success = 1"
                " WHERE order_status = 'CANCELLED'"
            ),
            {"at": _sql_time(now - timedelta(days=1))},
        )


def insert_requests(db: Engine, requests: list[Request]) -> None:
    """What a merchant's tool does: four columns, nothing else (a fifth, quantity, for a partial cancel)."""
    if not requests:
        return
    with db.begin() as conn:
        for r in requests:  # one statement each, so ids follow arrival order
            conn.execute(
                text(
                    "INSERT INTO req_order_ops (order_id, op_type, operator, reason, quantity) VALUES (:o, :t, :op, :r, :q)"
                ),
                {"o": r.order_id, "t": r.op_type, "op": r.operator, "r": r.reason, "q": r.quantity},
            )


def goods_snapshot(db: Engine) -> dict[int, tuple[str, int, int]]:
    with db.connect() as conn:
        return {
            r.id: (r.name, r.stock, r.sales) for r in conn.execute(text("SELECT id, name, stock, sales FROM goods"))
        }
