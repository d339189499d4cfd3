"""Stage 5, restore_stock: a cancelled order's goods go back on the shelf, exactly once.

Ready: ``goods_order2.stock_scanned = 0``, cancelled, not deleted, and either paid and
REFUNDED or never paid (idx_goods_order2_stock_pending). A refund that FAILED leaves stock alone.
Does: ``goods.stock += quantity`` in one aggregated UPDATE per batch, the batch's
last statement (``finish``): the goods rows are locked from there to the commit only, and
the orders of a goods row someone else holds wait (Later, no attempt) while the rest go on; oplog STOCK_RESTORED.
Flips: ``stock_scanned=1, stock_success=1``; ``1/0`` when the goods row is missing.
"""

from __future__ import annotations

from sqlalchemy import and_, or_

from cancel_scanner.engine.outcome import Failed
from cancel_scanner.engine.stage import Flags
from cancel_scanner.models import goods, goods_order2
from cancel_scanner.scanners.shop import GoodsMove

o = goods_order2.c
UINT_MAX = 2**32 - 1


class RestoreStock(GoodsMove):
    name = "restore_stock"
    flags = Flags.on(goods_order2, "stock", retry="stock")
    column = goods.c.stock
    sign = +1
    event = "STOCK_RESTORED"
    not_moved = "stock not restored"
    ready_order = (o.refund_status, o.id)  # idx_goods_order2_stock_pending: refund_status is its next column

    pending_since = o.cancelled_at

    def pending(self):
        return [
            o.stock_scanned == 0,
            o.stock_success == 0,
            o.order_status == "CANCELLED",
            o.refund_status.in_(("NONE", "REFUNDED")),
            o.is_deleted == 0,
            or_(
                and_(o.pay_status == 1, o.refund_status == "REFUNDED"),
                and_(o.pay_status == 0, o.refund_status == "NONE"),
            ),
        ]

    def refusal(self, goods_id: int, current: int, quantity: int) -> Failed | None:
        if current + quantity > UINT_MAX:
            return Failed("STOCK_OVERFLOW", f"goods {goods_id} stock would exceed {UINT_MAX}")
        return None
