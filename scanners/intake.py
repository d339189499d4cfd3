"""Stage 1, intake: a merchant's cancel request becomes a cancelled order and a refund, or a close.

Ready: ``req_order_ops.scanned = 0`` and not waiting for a retry (idx_req_order_ops_pending).
Does: validates the order. A paid order is cancelled, with a ``refund_order`` row whose
``out_refund_no`` is fixed now, before any call; oplog CANCELLED. An unpaid one is not cancelled
here: its row says the cancel was asked for (``cancel_requested_at``, ``cancel_source``) and
close_unpaid settles its payment with WeChat first (the user may have paid, or may be paying).
A request naming a ``quantity`` below the units left of a paid order is a partial cancel: the
order stays PAID, its ``cancelled_quantity`` and ``parts_quantity`` grow by that many units in
one conditional UPDATE (never past ``quantity``), and a refund of the units' share (scanners/parts.py)
is created with ``part = 1``; oplog PART_CANCELLED. The request for the last units cancels the order.
Flips: ``req_order_ops.scanned=1, success=1/0`` with ``result_code``/``result_msg``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, insert, or_, select, update

from cancel_scanner.engine.errors import SHOP_REFUSED
from cancel_scanner.engine.outcome import Done, Failed, Later, Outcome
from cancel_scanner.engine.sql import locked
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.gateway.channels import DEFAULT_CHANNEL
from cancel_scanner.gateway.contract import out_trade_no_problem
from cancel_scanner.i18n import DEFAULT_LOCALE, N_, Phrase, render, yuan
from cancel_scanner.models import goods_order2, refund_order, req_order_ops
from cancel_scanner.scanners.parts import MAX_REFUNDS_PER_PAYMENT, part_amount, part_event, refunds_of
from cancel_scanner.scanners.ship_timeout import SHIP_TIMEOUT_OP, IntakeSettings, ship_due
from cancel_scanner.scanners.shop import cancelled, write_oplog

CANCEL_SOURCES = {"MERCHANT_CANCEL": "MERCHANT", "USER_CANCEL": "USER", SHIP_TIMEOUT_OP: "SHIP_TIMEOUT"}
REFUND_WINDOW = timedelta(days=365)  # WeChat refunds only within one year of payment
BUSY_RETRY = timedelta(seconds=1)
WECHAT_REASON_MAX_BYTES = 80
DEFAULT_REASONS = {
    "MERCHANT": "merchant cancelled the order",
    "USER": "user cancelled the order",
    "SHIP_TIMEOUT": "not shipped in time: refunded",
}

# result codes (stable: merchants' tools match on them) and the messages they read
OK = "OK"
MESSAGES = {
    "ORDER_NOT_FOUND": N_("no order with this order_id"),
    "ALREADY_CANCELLED": N_("the order was already cancelled"),
    "ORDER_SHIPPED": N_("the order has shipped or completed: use after-sales, not cancel"),
    "ORDER_DELETED": N_("the order is deleted"),
    "UNSUPPORTED_OP": N_("op_type must be MERCHANT_CANCEL or USER_CANCEL"),
    "BAD_AMOUNT": N_("the order is marked paid but has amount 0 or no payment record: not refundable, check the order"),
    "DUPLICATE_REQUEST": N_("another request already cancelled this order"),
    "BAD_ORDER_STATE": N_("the order's status is not one the scanner knows: check the order"),
    "REFUND_WINDOW_EXPIRED": N_("paid more than a year ago: WeChat Pay no longer accepts a refund"),
    "BAD_ORDER_NO": N_(
        "the order's order_no is not one WeChat Pay accepts (6 to 32 letters, digits or _ - | *):"
        " not cancelled; nothing was sent to WeChat"
    ),
    # Given up after the retries: the shop's database (a trigger, a constraint) refused to change the order.
    "SHOP_REFUSED": N_("the shop's database refused to change this order"),
    "INCONSISTENT_PAYMENT": N_(
        "the order's payment fields disagree (pay_status, transaction_id, paid_at, order_status):"
        " not cancelled; correct the order, then send the request again"
    ),
    # Partial cancels (a request naming a quantity)
    "BAD_QUANTITY": N_("quantity must be a whole number of units above 0, or NULL for every unit left"),
    "QUANTITY_EXCEEDS_REMAINING": N_(
        "quantity is more than the units of the order not yet cancelled: nothing was cancelled"
    ),
    "PARTIAL_UNPAID": N_(
        "the order is not paid: a part of it cannot be refunded; change the order in the shop,"
        " or cancel all of it (quantity NULL)"
    ),
    "TOO_MANY_REFUNDS": N_(
        "the payment already has 50 refunds, WeChat Pay's limit:"
        " cancel the rest of the order at once, or refund it by hand"
    ),
    "PART_AMOUNT_ZERO": N_(
        "the units' share of the payment rounds down to 0 fen: nothing to refund; cancel more units at once"
    ),
}


UNITS_LEFT = N_(
    "quantity is more than the units of the order not yet cancelled: nothing was cancelled ({left} of {quantity} left)"
)

# A second cancel of an unpaid order whose first is with close_unpaid: not "already cancelled".
CLOSING_FOR_AN_EARLIER_REQUEST = N_(
    "an earlier request for this order is still closing its WeChat payment; the order is not cancelled yet:"
    " that request's result says how it ends"
)
CLOSE_FAILED_BEFORE = N_(
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
        "quantity",
        "cancelled_quantity",
    )
]
ACCEPTED_PAID = N_("cancelled; a full refund was started (see refund_order for its progress)")
ACCEPTED_UNPAID = N_(
    "accepted; the order shows no payment, so its WeChat payment is being closed first:"
    " it is cancelled (stock restored) once WeChat confirms, or refunded if the user had paid"
)


def accepted_part(units: int, left: int, amount: int, out_refund_no: str) -> str:
    return Phrase(
        N_(
            "{units} unit(s) cancelled, {left} left to ship; a refund of {yuan} ({amount} fen) was started"
            " ({out_refund_no}, see refund_order)"
        ),
        units=units,
        left=left,
        yuan=yuan(amount),
        amount=amount,
        out_refund_no=out_refund_no,
    )


def accepted_rest(units: int, amount: int, out_refund_no: str) -> str:
    return Phrase(
        N_(
            "cancelled; its last {units} unit(s) refunded with {yuan} ({amount} fen), the rest of the payment"
            " ({out_refund_no}, see refund_order)"
        ),
        units=units,
        yuan=yuan(amount),
        amount=amount,
        out_refund_no=out_refund_no,
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


def fit(message: str, width: int = 255) -> str:
    """result_msg is VARCHAR(255) characters; cut on a character, never mid-way through one."""
    return message[:width]


def reject(code: str) -> Failed:
    return Failed(code, MESSAGES[code])


class Intake(StageDefaults):
    name = "intake"
    flags = Flags.on(req_order_ops)
    feeds = ("submit_refund", "close_unpaid")
    failed_note = N_("request(s) rejected with a result code (req_order_ops.result_code)")
    rejections_are_routine = True
    bugs_stay_pending = True  # a merchant reads result_msg: never an internal error, the request waits
    pending_since = req_order_ops.c.created_at
    settings = IntakeSettings

    def __init__(
        self, ship_timeout_hours: float | None = None, ship_warn_hours: float = 12.0, locale: str = DEFAULT_LOCALE
    ):
        self.ship_timeout_hours = ship_timeout_hours
        self.ship_warn_hours = ship_warn_hours
        self.locale = locale  # the merchant reads result_msg in it

    @classmethod
    def from_config(cls, config) -> Intake:
        job = config.job(cls.name)
        return cls(job.ship_timeout_hours, job.ship_warn_hours, config.locale)

    def status_counts(self, conn: Connection, now: datetime):
        if self.ship_timeout_hours is None:
            return ()
        hours = max(0.0, self.ship_timeout_hours - self.ship_warn_hours)
        label = Phrase(
            N_("paid orders not shipped {hours} h after payment (cancelled and refunded at {timeout} h)"),
            hours=f"{hours:g}",
            timeout=f"{self.ship_timeout_hours:g}",
        )
        return (("ship_due", label, ship_due(conn, now - timedelta(hours=hours))),)

    def pending(self):
        r = req_order_ops.c
        return [r.scanned == 0, r.success == 0]

    def ready(self, now: datetime, limit: int):
        r = req_order_ops.c
        return (
            select(r.id, r.order_id, r.op_type, r.operator, r.reason, r.quantity, r.attempts)
            .where(*self.pending(), or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now))
            .order_by(r.id)
            .limit(limit)
        )

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {"result_code": OK, "result_msg": fit(render(outcome.detail or "", self.locale)), "scanned_at": now}

    def failed_values(self, outcome: Failed, now: datetime) -> Mapping[str, Any]:
        message = outcome.message
        if outcome.code == SHOP_REFUSED and message.startswith(f"{SHOP_REFUSED}: "):
            message = message[len(SHOP_REFUSED) + 2 :]  # the code has its own column; the shop's reason is the message
            return {"result_code": outcome.code[:32], "result_msg": fit(message), "scanned_at": now}
        return {"result_code": outcome.code[:32], "result_msg": fit(render(message, self.locale)), "scanned_at": now}

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        wanted = []
        for r in rows:
            if r.op_type not in CANCEL_SOURCES:
                outcomes[r.id] = reject("UNSUPPORTED_OP")
            elif r.quantity is not None and r.quantity <= 0:
                outcomes[r.id] = reject("BAD_QUANTITY")
            else:
                wanted.append(r)
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
        refunds = refunds_of(conn, [i for i, order in orders.items() if order.pay_status == 1])

        cancels: list[Cancel] = []
        seen_in_batch: dict[int, Cancel] = {}
        for req in wanted:  # rows come in id order: the first request for an order wins
            if req.order_id in busy:
                # Someone else holds the order row (the shop's own system, or another stage);
                # not an error: look again shortly, without spending an attempt.
                outcomes[req.id] = Later(now + BUSY_RETRY, "ORDER_BUSY: the order row is locked; will retry")
                continue
            order = orders.get(req.order_id)
            earlier = seen_in_batch.get(req.order_id)
            if order is None:
                outcomes[req.id] = reject("ORDER_NOT_FOUND")
            elif earlier is not None and earlier.part:
                # An earlier request of this batch cancelled part of the order: this one is judged on
                # what is left once that is written, in the next batch (no attempt spent).
                outcomes[req.id] = Later(now, "ORDER_BUSY: another request for this order comes first; will retry")
            elif earlier is not None:
                # The first of this batch cancelled a paid order, or handed an unpaid one to close_unpaid.
                outcomes[req.id] = (
                    reject("DUPLICATE_REQUEST")
                    if order.pay_status == 1
                    else Failed("DUPLICATE_REQUEST", CLOSING_FOR_AN_EARLIER_REQUEST)
                )
            else:
                judged = self._judge(req, order, now, accepted_before, refunds.get(order.id, (0, 0)))
                if isinstance(judged, Cancel):
                    seen_in_batch[req.order_id] = judged
                    cancels.append(judged)
                    outcomes[req.id] = Done(judged.message)
                else:
                    outcomes[req.id] = judged
        for cancel in self._cancel(conn, cancels, now):
            # The order changed between the read and the guarded UPDATE (it cannot while we hold its
            # row, but the guard is what keeps the amounts exact): judged again on a fresh read.
            outcomes[cancel.req.id] = Later(now, "ORDER_BUSY: the order changed while it was judged; will retry")
        return outcomes

    @staticmethod
    def _judge(
        req: Row, order: Row, now: datetime, accepted_before: set[int], refunds: tuple[int, int]
    ) -> Outcome | Cancel:
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
        left = order.quantity - order.cancelled_quantity
        if left < 0 or (left == 0 and order.quantity > 0):
            return reject("BAD_ORDER_STATE")  # more units cancelled than it has, or all of them and not cancelled
        units = left if req.quantity is None else req.quantity
        if units > left:
            return Failed(
                "QUANTITY_EXCEEDS_REMAINING",
                f"{MESSAGES['QUANTITY_EXCEEDS_REMAINING']} ({left} of {order.quantity} left)",
            )
        if out_trade_no_problem(order.order_no):
            return reject("BAD_ORDER_NO")  # WeChat would refuse the close or the refund: never sent
        if order.pay_status != 1:
            if units < left:
                return reject("PARTIAL_UNPAID")
            return Cancel(req, order, units, 0, 0, ACCEPTED_UNPAID)
        if not order.total_amount or not order.transaction_id:
            return reject("BAD_AMOUNT")
        if order.paid_at is not None and now - order.paid_at > REFUND_WINDOW:
            return reject("REFUND_WINDOW_EXPIRED")
        count, last_seq = refunds
        # WeChat's 50 refunds of a payment: a part may take the 49th at most, the 50th is kept for the rest
        if count >= (MAX_REFUNDS_PER_PAYMENT - 1 if units < left else MAX_REFUNDS_PER_PAYMENT):
            return reject("TOO_MANY_REFUNDS")
        amount = (
            part_amount(order.total_amount, order.quantity, order.cancelled_quantity, units)
            if order.quantity > 0
            else order.total_amount  # an order of no units (a shop's fee, a deposit) is cancelled whole
        )
        if amount <= 0:
            return reject("PART_AMOUNT_ZERO")
        seq = last_seq + 1
        if units < left:
            return Cancel(
                req,
                order,
                units,
                amount,
                seq,
                accepted_part(units, left - units, amount, out_refund_no_for(order.id, seq)),
            )
        if order.cancelled_quantity:
            return Cancel(
                req, order, units, amount, seq, accepted_rest(units, amount, out_refund_no_for(order.id, seq))
            )
        return Cancel(req, order, units, amount, seq, ACCEPTED_PAID)

    @staticmethod
    def _cancel(conn: Connection, cancels: list[Cancel], now: datetime) -> list[Cancel]:
        """Write the accepted cancels; the partial ones whose guarded UPDATE found the order changed are returned
        (nothing of theirs written)."""
        if not cancels:
            return []
        o = goods_order2.c
        changed = []
        for cancel in [c for c in cancels if c.part]:
            # The guard itself: never more units than the order has, counted from what we read.
            done = conn.execute(
                update(goods_order2)
                .where(
                    o.id == cancel.order.id,
                    o.order_status == "PAID",
                    o.is_deleted == 0,
                    o.cancelled_quantity == cancel.order.cancelled_quantity,
                    o.cancelled_quantity + cancel.units < o.quantity,
                )
                .values(
                    cancelled_quantity=o.cancelled_quantity + cancel.units,
                    parts_quantity=o.parts_quantity + cancel.units,
                )
            ).rowcount
            if done != 1:
                changed.append(cancel)
        wholes = [c for c in cancels if not c.part]
        paid = [c for c in wholes if c.order.pay_status == 1]
        unpaid = [c for c in wholes if c.order.pay_status != 1]
        for source in sorted({c.source for c in wholes}):
            paid_ids = [c.order.id for c in paid if c.source == source]
            if paid_ids:
                _guarded(
                    conn,
                    update(goods_order2)
                    .where(o.id.in_(paid_ids), o.order_status == "PAID", o.is_deleted == 0)
                    .values(cancelled(now, "REFUNDING", cancel_source=source)),
                    len(paid_ids),
                )
            unpaid_ids = [c.order.id for c in unpaid if c.source == source]
            if unpaid_ids:
                _guarded(
                    conn,
                    update(goods_order2)
                    .where(o.id.in_(unpaid_ids), o.order_status == "UNPAID", o.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=now, cancel_source=source),
                    len(unpaid_ids),
                )
        refunding = [c for c in cancels if c.amount and all(c is not x for x in changed)]
        if refunding:
            conn.execute(
                insert(refund_order),
                [
                    refund_row(
                        c.order.id,
                        c.order.order_no,
                        c.order.transaction_id,
                        c.amount,
                        wechat_reason(c.req.reason, c.source),
                        now,
                        req_id=c.req.id,
                        seq=c.seq,
                        channel=c.order.channel,
                        total=c.order.total_amount,
                        quantity=c.units,
                        part=c.part,
                    )
                    for c in refunding
                ],
            )
        write_oplog(
            conn,
            (
                (
                    c.order.id,
                    part_event("PART_CANCELLED", c.seq) if c.part else "CANCELLED",
                    f"req {c.req.id} {c.req.op_type} by {c.req.operator or '-'}"
                    + (f": {c.units} of {c.order.quantity} units, {c.amount} fen" if c.part else ""),
                )
                for c in refunding
            ),
        )
        return changed


@dataclass(frozen=True, eq=False)
class Cancel:
    """A request intake accepts: ``units`` of ``order``, refunding ``amount`` fen as refund ``seq`` (0: unpaid)."""

    req: Row
    order: Row
    units: int
    amount: int
    seq: int
    message: str

    @property
    def part(self) -> bool:
        """Some units stay: the order goes on."""
        return self.units < self.order.quantity - self.order.cancelled_quantity

    @property
    def source(self) -> str:
        return CANCEL_SOURCES[self.req.op_type]


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
    total: int | None = None,
    quantity: int | None = None,
    part: bool = False,
) -> dict[str, Any]:
    """A refund of ``amount`` fen of a paid order (the first unless ``seq`` says), its number fixed before any
    call, through the order's payment ``channel``. ``total``: what was paid (default ``amount``: all of it);
    ``quantity``: the units it pays back; ``part``: a partial cancel's refund, the order goes on."""
    return {
        "order_id": order_id,
        "req_id": req_id,
        "refund_seq": seq,
        "out_refund_no": out_refund_no_for(order_id, seq),
        "out_trade_no": out_trade_no,
        "transaction_id": transaction_id,
        "refund_amount": amount,
        "total_amount": amount if total is None else total,
        "reason": reason,
        "next_attempt_at": now,
        "channel": channel,
        "quantity": quantity,
        "part": int(part),
    }
