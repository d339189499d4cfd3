"""Stage 7, part_goods: a partial cancel's units go back on the shelf and off the sales, exactly once.

Ready: ``refund_order.part = 1``, its refund SUCCESS and written to the order (``sync_success = 1``),
``goods_scanned = 0`` (idx_refund_order_goods_pending). A part whose refund WeChat CLOSED waits
for `reissue`: no money went back, so no units do either.
Does: ``goods.stock += quantity`` and ``goods.sales -= quantity`` of the order's goods, for the
part's own units only (restore_stock and decrement_sales move the order's other units when it is
cancelled), both in the batch's last statements (``finish``), the goods rows locked from there to
the commit; oplog PART_STOCK_RESTORED#n and PART_SALES_DECREMENTED#n (n: the refund's refund_seq).
Flips: ``goods_scanned=1, goods_success=1``; ``1/0`` when the goods row is missing, the stock would
overflow or the sales would go below zero (then neither moves).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, Row, or_, select

from cancel_scanner.engine.outcome import Done, Failed, Outcome
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.models import goods, goods_order2, oplog, refund_order
from cancel_scanner.scanners.parts import part_event
from cancel_scanner.scanners.restore_stock import UINT_MAX
from cancel_scanner.scanners.shop import ALREADY_LOGGED, settle_goods, write_oplog

r = refund_order.c
STOCK_EVENT, SALES_EVENT = "PART_STOCK_RESTORED", "PART_SALES_DECREMENTED"


class PartGoods(StageDefaults):
    name = "part_goods"
    flags = Flags.on(refund_order, "goods", retry="goods")
    pending_since = r.updated_at
    index_prefix = (r.part == 1,)  # lets `status` count on idx_refund_order_goods_pending

    def pending(self):
        return [r.part == 1, r.sync_success == 1, r.goods_scanned == 0, r.goods_success == 0, r.progress_success == 1]

    def ready(self, now: datetime, limit: int):
        return (
            select(r.id, r.order_id, r.refund_seq, r.quantity, r.out_refund_no, r.goods_attempts)
            .where(*self.pending(), or_(r.goods_next_attempt_at.is_(None), r.goods_next_attempt_at <= now))
            .order_by(r.id)
            .limit(limit)
        )

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        goods_of = _goods_of(conn, rows)
        current = {
            g.id: (g.stock, g.sales)
            for g in conn.execute(
                select(goods.c.id, goods.c.stock, goods.c.sales).where(goods.c.id.in_(sorted(set(goods_of.values()))))
            )
        }
        logged = set(
            conn.execute(
                select(oplog.c.order_id, oplog.c.event).where(
                    oplog.c.order_id.in_(sorted({row.order_id for row in rows})),
                    oplog.c.event.in_(sorted({part_event(STOCK_EVENT, row.refund_seq) for row in rows})),
                )
            ).all()
        )
        outcomes: dict[int, Outcome] = {}
        moved: dict[int, int] = defaultdict(int)
        events = []
        for row in rows:
            goods_id, units = goods_of.get(row.order_id), row.quantity or 0
            if (row.order_id, part_event(STOCK_EVENT, row.refund_seq)) in logged:
                outcomes[row.id] = Failed(
                    ALREADY_LOGGED,
                    f"the oplog already has {part_event(STOCK_EVENT, row.refund_seq)}, not written by this stage:"
                    f" stock and sales not moved again; check goods {goods_id} by hand",
                )
            elif goods_id is None or goods_id not in current:
                outcomes[row.id] = Failed("GOODS_NOT_FOUND", f"goods of order {row.order_id} do not exist; not moved")
            elif current[goods_id][0] + moved[goods_id] + units > UINT_MAX:
                outcomes[row.id] = Failed("STOCK_OVERFLOW", f"goods {goods_id} stock would exceed {UINT_MAX}")
            elif current[goods_id][1] - moved[goods_id] < units:
                outcomes[row.id] = Failed(
                    "SALES_TOO_LOW",
                    f"goods {goods_id} sales {current[goods_id][1] - moved[goods_id]} lower than {units} units;"
                    " neither stock nor sales moved",
                )
            else:
                moved[goods_id] += units
                detail = f"goods {goods_id} {{:+d}} ({row.out_refund_no})"
                events += [
                    (row.order_id, part_event(STOCK_EVENT, row.refund_seq), detail.format(units)),
                    (row.order_id, part_event(SALES_EVENT, row.refund_seq), detail.format(-units)),
                ]
                outcomes[row.id] = Done()
        write_oplog(conn, events, keep_existing=False)  # one written since the read above fails the row (isolated)
        return outcomes

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes, now: datetime) -> None:
        done = [row for row in rows if isinstance(outcomes.get(row.id), Done)]
        if not done:
            return
        goods_of = _goods_of(conn, done)
        parts = {row.id: (goods_of[row.order_id], row.quantity or 0) for row in done}
        settle_goods(conn, goods.c.stock, parts, fits=lambda value, delta: value + delta <= UINT_MAX)
        settle_goods(
            conn, goods.c.sales, {rid: (g, -units) for rid, (g, units) in parts.items()}, fits=lambda v, d: v + d >= 0
        )


def _goods_of(conn: Connection, rows: Sequence[Row]) -> dict[int, int]:
    """The goods of each row's order (read without a lock: an order's goods_id does not change)."""
    o = goods_order2.c
    return dict(conn.execute(select(o.id, o.goods_id).where(o.id.in_(sorted({row.order_id for row in rows})))).all())
