"""Stage 5, restore_stock: a cancelled order's goods go back on the shelf, exactly once.

Ready: ``goods_order2.stock_scanned = 0``, cancelled, not deleted, and either paid and
REFUNDED or never paid (idx_goods_order2_stock_pending). A refund that FAILED leaves stock alone.
Does: ``goods.stock += quantity`` in one aggregated UPDATE per batch, the batch's
last statement (``finish``): the goods rows are locked from there to the commit only, and
the orders of a goods row someone else holds wait (Later, no attempt) while the rest go on; oplog STOCK_RESTORED.
Flips: ``stock_scanned=1, stock_success=1``; ``1/0`` when the goods row is missing.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Sequence

from sqlalchemy import Connection, Row, and_, or_, select

from cancel_scanner.engine.outcome import Done, Failed, Outcome
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.models import goods, goods_order2
from cancel_scanner.scanners.shop import read_goods, settle_goods, write_oplog

o = goods_order2.c
g = goods.c
UINT_MAX = 2**32 - 1


class RestoreStock(StageDefaults):
    name = "restore_stock"
    flags = Flags.on(goods_order2, "stock", retry="stock")

    pending_since = o.cancelled_at

    def pending(self):
        return [
            o.stock_scanned == 0,
            o.stock_success == 0,
            o.order_status == "CANCELLED",
            o.refund_status.in_(("NONE", "REFUNDED")),
            o.is_deleted == 0,
            or_(and_(o.pay_status == 1, o.refund_status == "REFUNDED"), and_(o.pay_status == 0, o.refund_status == "NONE")),
        ]

    def ready(self, now: datetime, limit: int):
        return (
            select(o.id, o.goods_id, o.quantity, o.stock_attempts)
            .where(
                *self.pending(),
                or_(o.stock_next_attempt_at.is_(None), o.stock_next_attempt_at <= now),
            )
            # In index order (refund_status is its next column): no sort of every pending row,
            # and FOR UPDATE locks only the rows returned, not all it read to sort them.
            .order_by(o.refund_status, o.id)
            .limit(limit)
        )

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        stock = read_goods(conn, (row.goods_id for row in rows), g.stock)
        outcomes: dict[int, Outcome] = {}
        add: dict[int, int] = defaultdict(int)
        events = []
        for row in rows:
            if row.goods_id not in stock:
                outcomes[row.id] = Failed("GOODS_NOT_FOUND", f"goods {row.goods_id} does not exist; stock not restored")
            elif stock[row.goods_id] + add[row.goods_id] + row.quantity > UINT_MAX:
                outcomes[row.id] = Failed("STOCK_OVERFLOW", f"goods {row.goods_id} stock would exceed {UINT_MAX}")
            else:
                add[row.goods_id] += row.quantity
                events.append((row.id, "STOCK_RESTORED", f"goods {row.goods_id} +{row.quantity}"))
                outcomes[row.id] = Done()
        write_oplog(conn, events)
        return outcomes

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes, now: datetime) -> None:
        # The goods rows last: the shop's checkouts wait for us only from here to the commit.
        moves = {row.id: (row.goods_id, row.quantity) for row in rows if isinstance(outcomes[row.id], Done)}
        settle_goods(conn, g.stock, moves, fits=lambda current, delta: current + delta <= UINT_MAX)
