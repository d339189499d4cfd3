"""Stage 6, decrement_sales: a refunded order no longer counts as a sale, exactly once.

Ready: ``goods_order2.sales_scanned = 0``, cancelled, not deleted, paid and REFUNDED
(idx_goods_order2_sales_pending). Unpaid orders never counted as sales.
Does: ``goods.sales -= quantity`` in one aggregated UPDATE per batch, the batch's
last statement (``finish``): the goods rows are locked from there to the commit only, and
the orders of a goods row someone else holds wait (Later, no attempt) while the rest go on; oplog SALES_DECREMENTED.
Flips: ``sales_scanned=1, sales_success=1``; ``1/0`` when the goods row is missing or its
sales are lower than the quantity (never a negative number).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Sequence

from sqlalchemy import Connection, Row, or_, select

from cancel_scanner.engine.outcome import Done, Failed, Outcome
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.models import goods, goods_order2
from cancel_scanner.scanners.shop import read_goods, settle_goods, write_oplog

o = goods_order2.c
g = goods.c


class DecrementSales(StageDefaults):
    name = "decrement_sales"
    flags = Flags.on(goods_order2, "sales", retry="sales")

    pending_since = o.refunded_at

    def pending(self):
        return [
            o.sales_scanned == 0,
            o.sales_success == 0,
            o.order_status == "CANCELLED",
            o.refund_status == "REFUNDED",
            o.is_deleted == 0,
            o.pay_status == 1,
        ]

    def ready(self, now: datetime, limit: int):
        return (
            select(o.id, o.goods_id, o.quantity, o.sales_attempts)
            .where(
                *self.pending(),
                or_(o.sales_next_attempt_at.is_(None), o.sales_next_attempt_at <= now),
            )
            .order_by(o.id)
            .limit(limit)
        )

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        sales = read_goods(conn, (row.goods_id for row in rows), g.sales)
        outcomes: dict[int, Outcome] = {}
        take: dict[int, int] = defaultdict(int)
        events = []
        for row in rows:
            if row.goods_id not in sales:
                outcomes[row.id] = Failed("GOODS_NOT_FOUND", f"goods {row.goods_id} does not exist; sales not decremented")
            elif sales[row.goods_id] - take[row.goods_id] < row.quantity:
                left = sales[row.goods_id] - take[row.goods_id]
                outcomes[row.id] = Failed(
                    "SALES_TOO_LOW", f"goods {row.goods_id} sales {left} lower than quantity {row.quantity}; not decremented"
                )
            else:
                take[row.goods_id] += row.quantity
                events.append((row.id, "SALES_DECREMENTED", f"goods {row.goods_id} -{row.quantity}"))
                outcomes[row.id] = Done()
        write_oplog(conn, events)
        return outcomes

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes, now: datetime) -> None:
        # The goods rows last: the shop's checkouts wait for us only from here to the commit.
        moves = {row.id: (row.goods_id, -row.quantity) for row in rows if isinstance(outcomes[row.id], Done)}
        settle_goods(conn, g.sales, moves, fits=lambda current, delta: current + delta >= 0)
