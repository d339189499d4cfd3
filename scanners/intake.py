"""Stage 1, intake: a merchant's cancel request becomes a cancelled order and a refund, or a close.

Ready: ``req_order_ops.scanned = 0`` and not waiting for a retry (idx_req_order_ops_pending).
Does: validates the order. A paid order is cancelled, with a ``refund_order`` row whose
``out_refund_no`` is fixed now, before any call; oplog CANCELLED. An unpaid one is not cancelled
here: its row says the cancel was asked for (``cancel_requested_at``, ``cancel_source``) and
close_unpaid settles its payment with WeChat first (the user may have paid, or may be paying).
Flips: ``req_order_ops.scanned=1, success=1/0`` with ``result_code``/``result_msg``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, insert, or_, select, update

from cancel_scanner.engine.errors import SHOP_REFUSED
from cancel_scanner.engine.outcome import Done, Failed, Later, Outcome
from cancel_scanner.engine.sql import locked
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.gateway.channels import DEFAULT_CHANNEL
from cancel_scanner.gateway.contract import out_trade_no_problem
from cancel_scanner.models import goods_order2, refund_order, req_order_ops
from cancel_scanner.scanners.shop import write_oplog

CANCEL_SOURCES = {"MERCHANT_CANCEL": "MERCHANT", "USER_CANCEL": "USER"}
REFUND_WINDOW = timedelta(days=365)  # WeChat refunds only within one year of payment
BUSY_RETRY = timedelta(seconds=1)
WECHAT_REASON_MAX_BYTES = 80
DEFAULT_REASONS = {"MERCHANT": "merchant cancelled the order", "USER": "user cancelled the order"}

# result codes (stable: merchants' tools match on them) and the messages they read
OK = "OK"
MESSAGES = {
    "ORDER_NOT_FOUND": "no order with this order_id",
    "ALREADY_CANCELLED": "the order was already cancelled",
    "ORDER_SHIPPED": "the order has shipped or completed: use after-sales, not cancel",
    "ORDER_DELETED": "the order is deleted",
    "UNSUPPORTED_OP": "op_type must be MERCHANT_CANCEL or USER_CANCEL",
    "BAD_AMOUNT": "the order is marked paid but has amount 0 or no payment record: not refundable, check the order",
    "DUPLICATE_REQUEST": "another request already cancelled this order",
    "BAD_ORDER_STATE": "the order's status is not one the scanner knows: check the order",
    "REFUND_WINDOW_EXPIRED": "paid more than a year ago: WeChat Pay no longer accepts a refund",
    "BAD_ORDER_NO": (
        "the order's order_no is not one WeChat Pay accepts (6 to 32 letters, digits or _ - | *):"
        " not cancelled; nothing was sent to WeChat"
    ),
    # Given up after the retries: the shop's database (a trigger, a constraint) refused to change the order.
    "SHOP_REFUSED": "the shop's database refused to change this order",
    "INCONSISTENT_PAYMENT": (
        "the order's payment fields disagree (pay_status, transaction_id, paid_at, order_status):"
        " not cancelled; correct the order, then send the request again"
    ),
}


# A second cancel of an unpaid order whose first is with close_unpaid: not "already cancelled".
CLOSING_FOR_AN_EARLIER_REQUEST = (
    "an earlier request for this order is still closing its WeChat payment; the order is not cancelled yet:"
    " that request's result says how it ends"
)
CLOSE_FAILED_BEFORE = (
    "an earlier request for this order could not close its WeChat payment and needs a person"
    " (goods_order2.close_last_error); the order is still unpaid, not cancelled"
)

ORDER_COLUMNS = [
    goods_order2.c[name]
    for name in (
        "id",
        "order_no",
        "pay_status",
        "transaction_id",
        "paid_at",
        "order_status",
        "total_amount",
        "is_deleted",
        "cancel_requested_at",
        "close_scanned",
        "close_success",
        "channel",
    )
]
ACCEPTED_PAID = "cancelled; a full refund was started (see refund_order for its progress)"
ACCEPTED_UNPAID = (
    "accepted; the order shows no payment, so its WeChat payment is being closed first:"
    " it is cancelled (stock restored) once WeChat confirms, or refunded if the user had paid"
)


def out_refund_no_for(order_id: int, seq: int = 1) -> str:
    """Deterministic, so a replayed intake names the same refund; only [0-9A-Za-z_-]."""
    return f"CSR{order_id}-{seq}"


def wechat_reason(text: str | None, source: str) -> str:
    """The refund reason WeChat shows the user: at most 80 bytes, cut on a character boundary."""
    reason = (text or "").strip() or DEFAULT_REASONS[source]
    encoded = reason.encode("utf-8")[:WECHAT_REASON_MAX_BYTES]
    return encoded.decode("utf-8", errors="ignore")


def payment_is_consistent(order: Row) -> bool:
    """Paid and unpaid each have one shape; anything between is not ours to guess."""
    if order.pay_status == 1:
        return order.order_status == "PAID"  # a missing transaction_id is BAD_AMOUNT, checked later
    if order.pay_status == 0:
        return order.order_status == "UNPAID" and not order.transaction_id and order.paid_at is None
    return False


def reject(code: str) -> Failed:
    return Failed(code, MESSAGES[code])


class Intake(StageDefaults):
    name = "intake"
    flags = Flags.on(req_order_ops)
    feeds = ("submit_refund", "close_unpaid")
    failed_note = "request(s) rejected with a result code (req_order_ops.result_code)"
    rejections_are_routine = True
    bugs_stay_pending = True  # a merchant reads result_msg: never an internal error, the request waits
    pending_since = req_order_ops.c.created_at

    def pending(self):
        r = req_order_ops.c
        return [r.scanned == 0, r.success == 0]

    def ready(self, now: datetime, limit: int):
        r = req_order_ops.c
        return (
            select(r.id, r.order_id, r.op_type, r.operator, r.reason, r.attempts)
            .where(*self.pending(), or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now))
            .order_by(r.id)
            .limit(limit)
        )

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {"result_code": OK, "result_msg": outcome.detail, "scanned_at": now}

    def failed_values(self, outcome: Failed, now: datetime) -> Mapping[str, Any]:
        message = outcome.message
        if outcome.code == SHOP_REFUSED and message.startswith(f"{SHOP_REFUSED}: "):
            message = message[len(SHOP_REFUSED) + 2 :]  # the code has its own column; the shop's reason is the message
        return {"result_code": outcome.code[:32], "result_msg": message[:255], "scanned_at": now}

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        wanted = [r for r in rows if r.op_type in CANCEL_SOURCES]
        for r in rows:
            if r.op_type not in CANCEL_SOURCES:
                outcomes[r.id] = reject("UNSUPPORTED_OP")
        order_ids = sorted({r.order_id for r in wanted})
        if not order_ids:
            return outcomes

        o = goods_order2.c
        orders = {
            row.id: row
            for row in conn.execute(
                locked(conn, select(*ORDER_COLUMNS).where(o.id.in_(order_ids)), skip_locked=True)
            ).all()
        }
        unlocked = [i for i in order_ids if i not in orders]
        busy = set(conn.execute(select(o.id).where(o.id.in_(unlocked))).scalars()) if unlocked else set()
        accepted_before = set(
            conn.execute(
                select(req_order_ops.c.order_id).where(
                    req_order_ops.c.order_id.in_(order_ids), req_order_ops.c.success == 1
                )
            ).scalars()
        )

        cancels: list[tuple[Row, Row]] = []  # (request, order)
        seen_in_batch: set[int] = set()
        for req in wanted:  # rows come in id order: the first request for an order wins
            if req.order_id in busy:
                # Someone else holds the order row (the shop's own system, or another stage);
                # not an error: look again shortly, without spending an attempt.
                outcomes[req.id] = Later(now + BUSY_RETRY, "ORDER_BUSY: the order row is locked; will retry")
                continue
            order = orders.get(req.order_id)
            if order is None:
                outcomes[req.id] = reject("ORDER_NOT_FOUND")
            elif req.order_id in seen_in_batch:
                # The first of this batch cancelled a paid order, or handed an unpaid one to close_unpaid.
                outcomes[req.id] = (
                    reject("DUPLICATE_REQUEST")
                    if order.pay_status == 1
                    else Failed("DUPLICATE_REQUEST", CLOSING_FOR_AN_EARLIER_REQUEST)
                )
            else:
                outcomes[req.id] = self._judge(order, now, accepted_before)
                if isinstance(outcomes[req.id], Done):
                    seen_in_batch.add(req.order_id)
                    cancels.append((req, order))
        self._cancel(conn, cancels, now)
        return outcomes

    @staticmethod
    def _judge(order: Row, now: datetime, accepted_before: set[int]) -> Outcome:
        if order.is_deleted:
            return reject("ORDER_DELETED")
        if order.order_status in ("UNPAID", "PAID") and not payment_is_consistent(order):
            # Guessing "unpaid" would cancel a paid order without a refund; guessing "paid" would
            # refund money nobody paid. Neither: the merchant fixes the order first.
            return reject("INCONSISTENT_PAYMENT")
        if order.order_status == "CANCELLED":
            return reject("DUPLICATE_REQUEST" if order.id in accepted_before else "ALREADY_CANCELLED")
        if order.cancel_requested_at is not None:
            # Not cancelled yet: say what is true of the earlier request, under the same stable code.
            if order.close_scanned == 1 and order.close_success == 0:
                return Failed("DUPLICATE_REQUEST", CLOSE_FAILED_BEFORE)
            return Failed("DUPLICATE_REQUEST", CLOSING_FOR_AN_EARLIER_REQUEST)
        if order.order_status in ("SHIPPED", "COMPLETED"):
            return reject("ORDER_SHIPPED")
        if order.order_status not in ("UNPAID", "PAID"):
            return reject("BAD_ORDER_STATE")
        if out_trade_no_problem(order.order_no):
            return reject("BAD_ORDER_NO")  # WeChat would refuse the close or the refund: never sent
        if order.pay_status == 1:
            if not order.total_amount or not order.transaction_id:
                return reject("BAD_AMOUNT")
            if order.paid_at is not None and now - order.paid_at > REFUND_WINDOW:
                return reject("REFUND_WINDOW_EXPIRED")
            return Done(ACCEPTED_PAID)
        return Done(ACCEPTED_UNPAID)

    @staticmethod
    def _cancel(conn: Connection, cancels: list[tuple[Row, Row]], now: datetime) -> None:
        if not cancels:
            return
        o = goods_order2.c
        paid = [(req, order) for req, order in cancels if order.pay_status == 1]
        unpaid = [(req, order) for req, order in cancels if order.pay_status != 1]
        for source in sorted({CANCEL_SOURCES[req.op_type] for req, _ in cancels}):
            paid_ids = [order.id for req, order in paid if CANCEL_SOURCES[req.op_type] == source]
            if paid_ids:
                _guarded(
                    conn,
                    update(goods_order2)
                    .where(o.id.in_(paid_ids), o.order_status == "PAID", o.is_deleted == 0)
                    .values(
                        order_status="CANCELLED", cancel_source=source, cancelled_at=now, refund_status="REFUNDING"
                    ),
                    len(paid_ids),
                )
            unpaid_ids = [order.id for req, order in unpaid if CANCEL_SOURCES[req.op_type] == source]
            if unpaid_ids:
                _guarded(
                    conn,
                    update(goods_order2)
                    .where(o.id.in_(unpaid_ids), o.order_status == "UNPAID", o.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=now, cancel_source=source),
                    len(unpaid_ids),
                )
        if paid:
            conn.execute(
                insert(refund_order),
                [
                    refund_row(
                        order.id,
                        order.order_no,
                        order.transaction_id,
                        order.total_amount,
                        wechat_reason(req.reason, CANCEL_SOURCES[req.op_type]),
                        now,
                        req_id=req.id,
                        channel=order.channel,
                    )
                    for req, order in paid
                ],
            )
        write_oplog(
            conn,
            ((order.id, "CANCELLED", f"req {req.id} {req.op_type} by {req.operator or '-'}") for req, order in paid),
        )


def _guarded(conn: Connection, statement, expected: int) -> None:
    """An UPDATE of rows this batch locked and judged: anything else than all of them is a bug."""
    done = conn.execute(statement).rowcount
    if done != expected:
        raise RuntimeError(f"intake: {expected} orders locked but {done} updated")


def refund_row(
    order_id: int,
    out_trade_no: str,
    transaction_id: str | None,
    amount: int,
    reason: str,
    now: datetime,
    *,
    req_id: int | None = None,
    seq: int = 1,
    channel: str = DEFAULT_CHANNEL,
) -> dict[str, Any]:
    """A refund of a paid order (the first unless ``seq`` says): all of what was paid, its number fixed before any call,
    through the order's payment ``channel``."""
    return {
        "order_id": order_id,
        "req_id": req_id,
        "refund_seq": seq,
        "out_refund_no": out_refund_no_for(order_id, seq),
        "out_trade_no": out_trade_no,
        "transaction_id": transaction_id,
        "refund_amount": amount,
        "total_amount": amount,
        "reason": reason,
        "next_attempt_at": now,
        "channel": channel,
    }
