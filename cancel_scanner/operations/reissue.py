"""`reissue`: a new refund for an order whose last refund WeChat Pay CLOSED.

WeChat answers a closed ``out_refund_no`` with CLOSED for ever, so trying again needs a new
number: the order's next ``refund_seq`` (``CSR<order>-<seq>``), for the same amount, sent by the
daemon's normal flow (submit_refund, poll_refund, sync_result, then stock and sales).

Refused, with a stable code, unless the order has a CLOSED refund not reissued yet, written back to
the order. The order's own refund (its cancel's) needs ``refund_status`` FAILED and no other refund of
its cancel live: never two live refunds of one cancel. A partial cancel's CLOSED refund (``part = 1``)
is reissued for the same units and amount, the order left going; the oldest such refund first. Never
past WeChat's 50 refunds of one payment (TOO_MANY_REFUNDS). The check and the writes
are one transaction that first locks the order's row and then its refunds, so a second reissue
of the same order waits, then finds the new live refund and is refused; the unique key
(order_id, refund_seq) refuses it as well, whoever writes, on a database without row locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from cancel_scanner.engine.outcome import clip
from cancel_scanner.engine.sql import locked
from cancel_scanner.i18n import N_, Phrase
from cancel_scanner.models import goods_order2, refund_order
from cancel_scanner.scanners.intake import refund_row
from cancel_scanner.scanners.parts import MAX_REFUNDS_PER_PAYMENT, refunds_of
from cancel_scanner.scanners.shop import refund_event, write_oplog

o, r = goods_order2.c, refund_order.c
REISSUED = "REISSUED"  # how a reissued CLOSED refund's last_error begins: it needs no person any more


@dataclass(frozen=True)
class Reissued:
    order_id: int
    refund_id: int
    out_refund_no: str
    refund_seq: int
    replaces: str  # the CLOSED refund's out_refund_no


@dataclass(frozen=True)
class Refused:
    order_id: int
    code: str
    message: str


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def reissue(db: Engine, order_id: int, *, now: datetime, by: str, why: str) -> Reissued | Refused:
    """One order: a new refund after a CLOSED one, or why not."""
    try:
        with db.begin() as conn:
            return _reissue(conn, order_id, now=now, by=by, why=why)
    except _Refusal as refusal:
        return Refused(order_id, refusal.code, refusal.message)
    except IntegrityError:
        # (order_id, refund_seq) or the oplog key: another reissue of this order committed first.
        return Refused(
            order_id,
            "CONCURRENT_REISSUE",
            N_("another reissue of this order was written at the same moment; see status"),
        )


def _reissue(conn, order_id: int, *, now: datetime, by: str, why: str) -> Reissued:
    order = conn.execute(
        locked(
            conn, select(o.id, o.order_no, o.transaction_id, o.order_status, o.refund_status).where(o.id == order_id)
        )
    ).first()
    if order is None:
        raise _Refusal("ORDER_NOT_FOUND", Phrase(N_("order {order} does not exist"), order=order_id))
    refunds = conn.execute(
        locked(conn, select(refund_order).where(r.order_id == order_id).order_by(r.refund_seq))
    ).all()
    if not refunds:
        raise _Refusal("NO_REFUND", Phrase(N_("order {order} has no refund to reissue"), order=order_id))
    last = _the_closed_one(refunds)
    if not last.part:
        live = [f.out_refund_no for f in refunds if not f.part and f is not last and f.wx_status != "CLOSED"]
        if live:
            raise _Refusal(
                "OTHER_REFUND_LIVE", Phrase(N_("refund {number} of the order is not CLOSED"), number=live[0])
            )
    if last.sync_scanned != 1 or (not last.part and order.refund_status != "FAILED"):
        raise _Refusal(
            "NOT_SYNCED",
            Phrase(
                N_(
                    "the order's refund_status is {status}: wait until the CLOSED result is"
                    " written to the order (status shows sync_result pending), then reissue"
                ),
                status=order.refund_status,
            ),
        )
    count, last_seq = refunds_of(conn, [order.id])[order.id]  # archived ones too
    if count >= (MAX_REFUNDS_PER_PAYMENT - 1 if last.part else MAX_REFUNDS_PER_PAYMENT):  # the last: the order's
        raise _Refusal(
            "TOO_MANY_REFUNDS",
            Phrase(N_("the payment has {count} refunds, WeChat Pay's limit: refund it by hand"), count=count),
        )
    seq = last_seq + 1
    new = refund_row(
        order.id,
        order.order_no,
        last.transaction_id or order.transaction_id,
        last.refund_amount,
        last.reason or "",
        now,
        req_id=last.req_id,
        seq=seq,
        channel=last.channel,
        total=last.total_amount,
        quantity=last.quantity,
        part=bool(last.part),
    )
    refund_id = conn.execute(insert(refund_order).values(**new)).inserted_primary_key[0]
    if not last.part:  # a partial cancel's refund leaves the order as it is: it goes on
        moved = conn.execute(
            update(goods_order2)
            .where(o.id == order.id, o.refund_status == "FAILED")
            .values(refund_status="REFUNDING", wx_progress_scanned=0)
        ).rowcount
        if moved != 1:  # the order row is locked by us: anything else is a bug, and rolls back
            raise RuntimeError(f"reissue: order {order.id} not moved back to REFUNDING")
    conn.execute(
        update(refund_order)
        .where(r.id == last.id)
        .values(last_error=clip(f"{REISSUED} as {new['out_refund_no']} by {by}: {why}"))
    )
    write_oplog(
        conn,
        [
            (
                order.id,
                refund_event("REFUND_REISSUED", seq),
                f"{new['out_refund_no']} replaces {last.out_refund_no} (CLOSED) by {by}: {why}",
            )
        ],
    )
    return Reissued(order.id, refund_id, new["out_refund_no"], seq, last.out_refund_no)


def _replaced(refund: Any, refunds: Any) -> bool:
    """A later refund of the same request exists: ``refund`` was reissued already, whatever its last_error says
    now (a requeue rewrites it). Each request's refunds share its req_id; a reissue copies it."""
    return refund.req_id is not None and any(
        f.req_id == refund.req_id and f.refund_seq > refund.refund_seq for f in refunds
    )


def _the_closed_one(refunds) -> Any:
    """The refund to reissue: the first CLOSED one not reissued yet (a partial cancel's, or the order's);
    or the refusal that says why there is none."""
    waiting = [f for f in refunds if not (f.last_error or "").startswith(REISSUED) and not _replaced(f, refunds)]
    closed = [f for f in waiting if f.wx_status == "CLOSED" and (f.progress_scanned, f.progress_success) == (1, 0)]
    if closed:
        return closed[0]
    latest = waiting[-1] if waiting else refunds[-1]
    raise _Refusal(
        "NOT_CLOSED",
        Phrase(
            N_("its last refund {number} is {status}, not CLOSED: only a refund WeChat closed is reissued"),
            number=latest.out_refund_no,
            status=latest.wx_status or "not sent yet",
        ),
    )
