"""Stage 4, sync_result: write the refund's final result back to its order.

Ready: ``refund_order.progress_scanned = 1, sync_scanned = 0`` (idx_refund_order_sync_pending).
Does: SUCCESS makes the order REFUNDED with ``refunded_at`` (WeChat's success_time) and writes
oplog REFUND_SUCCEEDED; CLOSED makes it FAILED and writes REFUND_FAILED (stock and sales are
then left alone). Sets the order's ``wx_progress_scanned = 1``. Every SUCCESS adds its amount to
the order's ``refunded_amount``. A partial cancel's refund (``part = 1``) leaves the order's state
as it is (the order goes on): its SUCCESS adds to ``refunded_amount`` and hands its units to
part_goods; its CLOSED is written to the oplog only, and the part waits for `reissue`.
Flips: ``sync_scanned=1, sync_success=1``; ``1/0`` if the refund's state is unknown (its poll
gave up) or the order is no longer REFUNDING, so a person looks before any money state is claimed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Row, select, update

from cancel_scanner.engine.outcome import Done, Failed, Later, Outcome
from cancel_scanner.engine.sql import IntCase, by_id, locked
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.models import goods_order2, refund_order
from cancel_scanner.scanners.poll_refund import CONFLICTING_ANSWERS
from cancel_scanner.scanners.shop import refund_event, write_oplog

r = refund_order.c
o = goods_order2.c
BUSY_RETRY = timedelta(seconds=1)


class SyncResult(StageDefaults):
    name = "sync_result"
    feeds = ("restore_stock", "decrement_sales", "part_goods")
    flags = Flags.on(refund_order, "sync")

    pending_since = r.updated_at
    index_prefix = (r.progress_scanned == 1,)  # lets `status` count on idx_refund_order_sync_pending

    def pending(self):
        return [r.progress_scanned == 1, r.sync_scanned == 0, r.sync_success == 0]

    def ready(self, now: datetime, limit: int):
        return (
            select(
                r.id,
                r.order_id,
                r.refund_seq,
                r.out_refund_no,
                r.refund_amount,
                r.wx_status,
                r.progress_success,
                r.success_time,
                r.attempts,
                r.last_error,
                r.part,
            )
            .where(*self.pending())
            .order_by(r.id)
            .limit(limit)
        )

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        order_ids = sorted({row.order_id for row in rows})
        orders = {
            row.id: row
            for row in conn.execute(
                locked(conn, select(o.id, o.refund_status).where(o.id.in_(order_ids)), skip_locked=True)
            ).all()
        }
        unlocked = [i for i in order_ids if i not in orders]
        busy = set(conn.execute(select(o.id).where(o.id.in_(unlocked))).scalars()) if unlocked else set()

        refunded: dict[int, datetime] = {}
        amounts: dict[int, int] = defaultdict(int)  # fen confirmed, by order
        failed: list[int] = []
        events = []
        for row in rows:
            order = orders.get(row.order_id)
            if row.order_id in busy:
                # Keep a conflict's reason on the row: it is what this stage will act on next time.
                keep = row.last_error if (row.last_error or "").startswith(CONFLICTING_ANSWERS) else None
                outcomes[row.id] = Later(now + BUSY_RETRY, keep or "ORDER_BUSY: the order row is locked; will retry")
            elif order is None:
                outcomes[row.id] = Failed("ORDER_NOT_FOUND", f"order {row.order_id} is gone; refund result not written")
            elif order.refund_status != "REFUNDING" and not row.part:
                outcomes[row.id] = Failed(
                    "ORDER_STATE_CHANGED", f"order refund_status is {order.refund_status}, expected REFUNDING"
                )
            elif row.progress_success == 1 and row.wx_status == "SUCCESS":
                amounts[row.order_id] += row.refund_amount
                if not row.part:
                    refunded[row.order_id] = row.success_time or now
                events.append(
                    (
                        row.order_id,
                        refund_event("REFUND_SUCCEEDED", row.refund_seq),
                        f"{row.out_refund_no} {row.refund_amount} fen",
                    )
                )
                outcomes[row.id] = Done()
            elif row.progress_success == 0 and (row.last_error or "").startswith(CONFLICTING_ANSWERS):
                # WeChat said SUCCESS and then something else: neither is written to the order.
                outcomes[row.id] = Failed(CONFLICTING_ANSWERS, row.last_error[len(CONFLICTING_ANSWERS) + 2 :])
            elif row.progress_success == 0 and row.wx_status == "CLOSED":
                if not row.part:
                    failed.append(row.order_id)
                events.append(
                    (
                        row.order_id,
                        refund_event("REFUND_FAILED", row.refund_seq),
                        f"{row.out_refund_no} closed by WeChat Pay",
                    )
                )
                outcomes[row.id] = Done()
            else:
                outcomes[row.id] = Failed(
                    "REFUND_STATE_UNKNOWN",
                    f"polling gave up with WeChat status {row.wx_status} ({row.last_error or 'no reason'}):"
                    " check the refund by hand",
                )
        if refunded:
            conn.execute(
                update(goods_order2)
                .where(o.id.in_(list(refunded)), o.refund_status == "REFUNDING")
                .values(refund_status="REFUNDED", refunded_at=by_id(o.id, refunded), wx_progress_scanned=1)
            )
        if failed:
            conn.execute(
                update(goods_order2)
                .where(o.id.in_(failed), o.refund_status == "REFUNDING")
                .values(refund_status="FAILED", wx_progress_scanned=1)
            )
        if amounts:
            conn.execute(
                update(goods_order2)
                .where(o.id.in_(list(amounts)))
                .values(refunded_amount=o.refunded_amount + IntCase(o.id, dict(amounts)))
            )
        write_oplog(conn, events)
        return outcomes
