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

from cancel_scanner.engine.outcome import Failed
from cancel_scanner.engine.stage import Flags
from cancel_scanner.models import goods, goods_order2
from cancel_scanner.scanners.shop import GoodsMove

o = goods_order2.c


class DecrementSales(GoodsMove):
    name = "decrement_sales"
    flags = Flags.on(goods_order2, "sales", retry="sales")
    column = goods.c.sales
    sign = -1
    event = "SALES_DECREMENTED"
    not_moved = "sales not decremented"
    ready_order = (o.id,)

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

    def refusal(self, goods_id: int, current: int, quantity: int) -> Failed | None:
        if current < quantity:  # never a negative number of sales
            return Failed(
                "SALES_TOO_LOW", f"goods {goods_id} sales {current} lower than quantity {quantity}; not decremented"
            )
        return None
