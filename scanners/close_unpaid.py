"""Stage 7, close_unpaid: settle an unpaid order with WeChat before anything local changes.

Ready (idx_goods_order2_close_pending, two ranges): ``close_scanned = 0`` and either a cancel was
requested (``cancel_requested_at``; intake hands every unpaid cancel here) or nobody asked and the
order is still ``UNPAID`` past ``pay_timeout_seconds``; never an order younger than 5 minutes;
due and not leased.
Does, outside any transaction: query the payment; if it is not paid (NOTPAY, REVOKED, PAYERROR) or
the query says WeChat does not know it (ORDER_NOT_EXIST: an unsigned error, and transient right
after a prepay, so no proof), close it and query again. A 204 is never proof: only what the query
after it says counts (with the close's own ORDER_NOT_EXIST, when WeChat's signature on it verifies).
Then, in one transaction with the order row locked:

- CLOSED (or NOTPAY, or no such trade, again after a close WeChat took: 204 or ORDER_CLOSED), or a
  close WeChat answered ORDER_NOT_EXIST under its own fresh signature between two queries that did
  not know the trade either: the order is cancelled
  (``cancel_source`` TIMEOUT when nobody asked), ``restore_stock`` gives its stock back; oplog
  PAYMENT_CLOSED, CANCELLED.
- SUCCESS or REFUND: the payment notification was lost. The payment is booked as the shop books
  a notified one (``pay_status=1``, ``transaction_id``, ``paid_at``, ``PAID``, ``sales +=
  quantity``; oplog PAYMENT_FOUND); a requested cancel then goes on as a paid cancel (one refund
  of what was paid). A timeout never cancels a paid order.
- USERPAYING: look again shortly; never close while the user pays.
- The shop booked the payment itself meanwhile (its notification came late): nothing is booked
  twice; a requested cancel goes on as a paid cancel.
- NOTPAY after a close that failed (a 500, a drop, a redirect: it may never have closed): the
  close's failure is the outcome, retried; the user could still pay.
- Soft-deleted meanwhile: nothing of the shop's is touched (a paid one goes to a person); an
  unpaid order the shop moved on (shipped) that WeChat says is paid goes to a person too.

Flips: ``close_scanned=1, close_success=1`` when settled; ``1/0`` for a person (an amount that
differs from the order's); unknown answers are retried with the same question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import Connection, Row, and_, insert, or_, select, update

import cancel_scanner.gateway.contract as gw
from cancel_scanner.engine.facts import Fact
from cancel_scanner.engine.logs import EventLog
from cancel_scanner.engine.outcome import Done, Failed, Later, Outcome, Retry
from cancel_scanner.engine.settings import GatewayJobSettings, Seconds
from cancel_scanner.engine.sql import locked
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.gateway.channels import route
from cancel_scanner.i18n import N_
from cancel_scanner.models import goods, goods_order2, refund_order
from cancel_scanner.scanners.intake import DEFAULT_REASONS, refund_row
from cancel_scanner.scanners.shop import adjust_goods, cancelled, lock_goods, write_oplog
from cancel_scanner.scanners.submit_refund import outcome_for

o = goods_order2.c
MIN_AGE = timedelta(minutes=5)  # WeChat's older APIs refuse to close a younger order; it costs nothing to wait
USER_PAYING_RETRY = timedelta(seconds=30)
NOT_FOUND_RECHECK = timedelta(seconds=60)
NOT_FOUND_NOTE = "ORDER_NOT_EXIST"
BAD_ORDER_NO = "BAD_ORDER_NO"
BUSY_RETRY = timedelta(seconds=1)
DEFAULT_PAY_TIMEOUT_SECONDS = 1800.0


class CloseSettings(GatewayJobSettings):
    """How long an order may stay unpaid before it is closed (never under 5 minutes)."""

    pay_timeout_seconds: Annotated[Seconds, Field(ge=MIN_AGE.total_seconds())] = DEFAULT_PAY_TIMEOUT_SECONDS
    # No longer used (a query's ORDER_NOT_EXIST is answered by sending the close); accepted so that
    # existing configurations stay valid.
    not_found_recheck_seconds: Annotated[Seconds, Field(ge=1)] = NOT_FOUND_RECHECK.total_seconds()


@dataclass(frozen=True)
class Settling:
    """What WeChat said of one unpaid order: the first query, the close if one was sent, the query after it."""

    first: Any
    close: Any = None
    after: Any = None

    @property
    def last(self) -> Any:
        return self.after if self.after is not None else self.first


def _not_found(result: Any) -> bool:
    return isinstance(result, gw.Permanent) and result.code in gw.TRADE_NOT_FOUND_CODES


class CloseUnpaid(StageDefaults):
    name = "close_unpaid"
    oldest_pending_alert_seconds = 3_600  # an order waits out its payment timeout first
    kind = "gateway"
    settings = CloseSettings
    endpoint = "pay_query"  # two queries per close: the query pace bounds a batch
    feeds = ("submit_refund", "restore_stock")
    flags = Flags.on(goods_order2, "close", retry="close", leased=True)
    failed_note = N_("unpaid order(s) WeChat's answer left for a person (close_last_error)")
    index_prefix = ()  # the flags lead idx_goods_order2_close_pending: done/failed counted from it alone
    pending_since = o.created_at

    def __init__(self, pay_timeout_seconds: float = DEFAULT_PAY_TIMEOUT_SECONDS):
        self.pay_timeout = timedelta(seconds=pay_timeout_seconds)

    @classmethod
    def from_config(cls, config) -> CloseUnpaid:
        job = config.job(cls.name)
        return cls(job.pay_timeout_seconds)

    def pending(self):
        # What `status` counts as this stage's backlog: the cancels merchants asked for. An unpaid
        # order nobody asked about becomes work only when its payment timeout passes (ready()).
        return [o.close_scanned == 0, o.close_success == 0, o.cancel_requested_at.isnot(None), o.is_deleted == 0]

    def leased_by(self, owner: str):
        # close 0/0 also holds every paid order never cancelled: only ready()'s two ranges bound it
        # (close_lease_owner has no index). A row the shop marks paid while leased is missed meanwhile.
        requested = o.cancel_requested_at.isnot(None)
        unpaid = and_(o.cancel_requested_at.is_(None), o.order_status == "UNPAID")
        return [o.close_scanned == 0, o.close_success == 0, or_(requested, unpaid), o.close_lease_owner == owner]

    def ready(self, now: datetime, limit: int):
        requested = o.cancel_requested_at.isnot(None)
        timed_out = and_(
            o.cancel_requested_at.is_(None), o.order_status == "UNPAID", o.created_at <= now - self.pay_timeout
        )
        return (
            select(o.id, o.order_no, o.created_at, o.close_attempts, o.close_last_error, o.close_lease_owner, o.channel)
            .where(
                o.close_scanned == 0,
                o.close_success == 0,
                or_(requested, timed_out),  # two ranges of idx_goods_order2_close_pending
                o.is_deleted == 0,
                o.created_at <= now - MIN_AGE,
                or_(o.close_next_attempt_at.is_(None), o.close_next_attempt_at <= now),
                or_(o.close_lease_until.is_(None), o.close_lease_until < now),
            )
            .limit(limit)
        )

    # -- the calls ---------------------------------------------------------------------------------

    def call(self, gateway: gw.PaymentGateway, row: Row, deadline: Callable[[], float]) -> Settling:
        problem = gw.out_trade_no_problem(row.order_no)
        if problem is not None:
            # WeChat would refuse it; never sent, and no traceback for a refusal we expect.
            return Settling(gw.Permanent(BAD_ORDER_NO, f"{problem}: never sent to WeChat Pay; check the order by hand"))
        gateway = route(gateway, row.channel)  # the order's payment channel
        first = gateway.query_payment(row.order_no, deadline=deadline)
        unpaid = isinstance(first, gw.PaymentState) and first.payment.trade_state in gw.CLOSABLE_STATES
        if not (unpaid or _not_found(first)):
            return Settling(first)
        # A query's "no such trade" is no proof (an unsigned error, transient right after a prepay):
        # the close is sent all the same, and only its own signed answer, or the query after it, decides.
        close = gateway.close_payment(row.order_no, deadline=deadline)
        if isinstance(close, gw.NotSent):
            return Settling(first, close)
        # Whatever the close said (204, a signed "no such trade", an error, nothing), the query after
        # it says what the trade is now.
        return Settling(first, close, gateway.query_payment(row.order_no, deadline=deadline))

    def not_sent(self, result: Any) -> bool:
        return isinstance(result, Settling) and isinstance(result.first, gw.NotSent)

    def channel_fact(self, row: Row, result: Any) -> Fact | None:
        """What WeChat did to the trade, kept if the order cannot be updated here (a shop rule refuses it)."""
        if not isinstance(result, Settling):
            return None
        verdict = self._verdict(row, result, datetime.min)
        if verdict == "closed":
            return Fact("PAYMENT_CLOSED", row.order_no, row.id, "trade closed at WeChat Pay")
        if isinstance(verdict, gw.Payment):
            return Fact(
                "PAYMENT_PAID",
                row.order_no,
                row.id,
                f"trade paid at WeChat Pay ({verdict.transaction_id}, {verdict.total} fen)",
            )
        return None

    # -- the answers ---------------------------------------------------------------------------------

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> dict[int, Outcome]:
        ids = [row.id for row, _ in results]
        query = (
            select(
                o.id,
                o.order_no,
                o.goods_id,
                o.quantity,
                o.total_amount,
                o.pay_status,
                o.order_status,
                o.transaction_id,
                o.cancel_requested_at,
                o.cancel_source,
                o.is_deleted,
                o.channel,
            )
            .where(o.id.in_(ids))
            .order_by(o.id)
        )
        orders = {r.id: r for r in conn.execute(locked(conn, query, skip_locked=True)).all()}
        verdicts = {row.id: self._verdict(row, settling, now) for row, settling in results}
        found = {
            i: v
            for i, v in verdicts.items()
            if isinstance(v, gw.Payment) and i in orders and orders[i].pay_status == 0 and not orders[i].is_deleted
        }
        stock, busy = lock_goods(conn, {orders[i].goods_id for i in found}, goods.c.sales) if found else ({}, set())
        outcomes: dict[int, Outcome] = {}
        for row, _ in results:
            order, verdict = orders.get(row.id), verdicts[row.id]
            if order is None or (row.id in found and order.goods_id in busy):
                # The shop holds the order or its goods row: ask again in a moment (the query moves no money).
                outcomes[row.id] = Later(
                    now + BUSY_RETRY, "ORDER_BUSY: the order or its goods row is locked; will retry"
                )
            elif order.is_deleted and isinstance(verdict, (gw.Payment, str)):
                outcomes[row.id] = self._deleted(order, verdict)
            elif isinstance(verdict, gw.Payment):
                outcomes[row.id] = self._paid(conn, order, verdict, now, stock)
            elif verdict == "closed":
                outcomes[row.id] = self._closed(conn, order, now, "PAYMENT_CLOSED")
            elif verdict == "never_seen":
                outcomes[row.id] = self._closed(conn, order, now, None)
            else:
                outcomes[row.id] = verdict
        return outcomes

    def _verdict(
        self, row: Row, settling: Settling, now: datetime
    ) -> gw.Payment | Literal["closed", "never_seen"] | Outcome:
        """A paid Payment, "closed", "never_seen", or the row's outcome as it stands."""
        last = settling.last
        if isinstance(settling.close, gw.NotSent) or isinstance(last, gw.NotSent):
            # The query after a close was not sent either: the lease ran out. Only a query says what the close did.
            return Later(now, "CALL_NOT_SENT: no time left for the close or the query after it; asked again")
        if isinstance(settling.close, gw.ConfigError) or isinstance(last, gw.ConfigError):
            return outcome_for(
                settling.close if isinstance(settling.close, gw.ConfigError) else last, may_have_reached=False
            )
        if isinstance(last, gw.PaymentState):
            state = last.payment.trade_state
            if last.payment.paid:
                return last.payment
            if state == "CLOSED" or (isinstance(settling.close, gw.CloseSent) and state in gw.CLOSABLE_STATES):
                return "closed"  # CLOSED, or still unpaid after WeChat took our close: nobody can pay it now
            if isinstance(settling.close, gw.NoSuchTrade):
                # WeChat's close says it has no such trade, its query shows one: neither is believed.
                return Retry(
                    "CONTRADICTING_ANSWERS",
                    f"WeChat's close says it has no trade {row.order_no}, its query"
                    f" says {state}: not cancelled; asked again",
                )
            if state in gw.CLOSABLE_STATES and settling.close is not None:
                # Unpaid, and the close failed (a 500, a dropped connection, a redirect): the user can still pay.
                return outcome_for(settling.close, may_have_reached=False)
            if state == "USERPAYING":
                return Later(now + USER_PAYING_RETRY, "USER_PAYING: the user is paying; never closed meanwhile")
            return Retry("UNEXPECTED_TRADE_STATE", f"trade {row.order_no} is {state}")
        if _not_found(last) and isinstance(settling.close, gw.CloseSent):
            # WeChat took our close (204, signed) and its query does not know the trade: if it existed,
            # that close closed it; if not, there is nothing to pay. Nobody can pay it either way.
            return "closed"
        if _not_found(last) and _not_found(settling.first) and isinstance(settling.close, gw.NoSuchTrade):
            return "never_seen"  # both queries and WeChat's own signed answer to the close: no such trade
        if _not_found(settling.first) or _not_found(last):
            # WeChat's query did not know the trade, and neither its close nor a query after it
            # settled it: never cancelled on an absence nobody confirmed; asked again.
            said = getattr(settling.close, "code", None) or "no close"
            return Retry(
                NOT_FOUND_NOTE,
                f"WeChat's query does not know trade {row.order_no} and the close did not confirm"
                f" it ({said}): not cancelled; asked again",
                give_up_code="NOT_FOUND_UNCONFIRMED",
            )
        return outcome_for(last, may_have_reached=False)  # a query or a close: asking again moves no money

    def _paid(self, conn: Connection, order: Row, payment: gw.Payment, now: datetime, sales: dict[int, int]) -> Outcome:
        log = EventLog(stage=self.name, order_id=order.id, out_trade_no=order.order_no)
        if payment.total != order.total_amount:
            log.bind(action="amount_differs").error("WeChat's payment differs from the order's amount")
            return Failed(
                "PAID_AMOUNT_DIFFERS",
                f"WeChat says {payment.total} fen paid, the order says {order.total_amount}: check by hand",
            )
        if order.pay_status == 0 and order.order_status != "UNPAID":
            # Shipped (or otherwise moved on) without a payment, while WeChat says it was paid: no guess.
            return Failed(
                "CONFLICTING_PAYMENT",
                f"WeChat says trade {order.order_no} is paid, the order is {order.order_status}"
                " without a payment: check by hand",
            )
        if order.pay_status == 0:
            booked = conn.execute(
                update(goods_order2)
                .where(o.id == order.id, o.pay_status == 0, o.order_status == "UNPAID")
                .values(
                    pay_status=1,
                    transaction_id=payment.transaction_id,
                    paid_at=payment.success_time,
                    order_status="PAID",
                )
            ).rowcount
            if booked != 1:
                return Later(now + BUSY_RETRY, "ORDER_CHANGED: the order changed under us; looked at again")
            adjust_goods(conn, goods.c.sales, {order.goods_id: order.quantity})
            write_oplog(
                conn, [(order.id, "PAYMENT_FOUND", f"{payment.transaction_id} {payment.total} fen, notification lost")]
            )
            log.bind(action="payment_found", transaction_id=payment.transaction_id).warning(
                "a lost payment notification: payment booked"
            )
        if order.cancel_requested_at is None:
            return Done("PAYMENT_FOUND")  # a timeout never cancels a paid order
        return self._paid_cancel(conn, order, payment, now)

    def _paid_cancel(self, conn: Connection, order: Row, payment: gw.Payment, now: datetime) -> Outcome:
        source = order.cancel_source or "MERCHANT"
        done = conn.execute(
            update(goods_order2).where(o.id == order.id, o.order_status == "PAID").values(cancelled(now, "REFUNDING"))
        ).rowcount
        if done != 1:
            return Done("ALREADY_SETTLED")  # shipped or cancelled by someone else meanwhile: not ours to refund
        transaction_id = payment.transaction_id or order.transaction_id
        assert payment.total is not None  # _paid returned unless it equals the order's total_amount (NOT NULL)
        conn.execute(
            insert(refund_order),
            [
                refund_row(
                    order.id,
                    order.order_no,
                    transaction_id,
                    payment.total,
                    DEFAULT_REASONS.get(source, DEFAULT_REASONS["MERCHANT"]),
                    now,
                    channel=order.channel,
                    quantity=order.quantity,
                )
            ],
        )
        write_oplog(
            conn, [(order.id, "CANCELLED", f"requested cancel of a paid order ({source}): refund {payment.total} fen")]
        )
        return Done("PAID_CANCEL")

    def _deleted(self, order: Row, verdict: gw.Payment | str) -> Outcome:
        """Soft-deleted while its calls ran: the shop's row is not ours to book or cancel any more."""
        if isinstance(verdict, gw.Payment):
            return Failed(
                "PAID_ORDER_DELETED",
                f"WeChat says trade {order.order_no} is paid ({verdict.total} fen),"
                " the order was deleted meanwhile: check by hand",
            )
        return Done("ORDER_DELETED")  # nothing to pay any more, nothing of the shop's touched

    def _closed(self, conn: Connection, order: Row, now: datetime, event: str | None) -> Outcome:
        if order.pay_status != 0 or order.order_status != "UNPAID":
            # The shop booked a payment meanwhile, though WeChat says the trade is closed or unknown.
            return Failed(
                "CONFLICTING_PAYMENT",
                f"WeChat says trade {order.order_no} is not paid, the order says it is: check by hand",
            )
        source = order.cancel_source or "TIMEOUT"
        conn.execute(
            update(goods_order2)
            .where(o.id == order.id, o.order_status == "UNPAID", o.pay_status == 0)
            .values(cancelled(now, "NONE", cancel_source=source))
        )
        events = [(order.id, event, f"closed at WeChat ({source})")] if event else []
        why = "WeChat closed the payment" if event else "WeChat never saw a payment for it"
        write_oplog(conn, [*events, (order.id, "CANCELLED", f"unpaid order cancelled ({source}): {why}")])
        return Done("CLOSED" if event else "NOT_AT_WECHAT")
