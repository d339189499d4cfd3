"""Stage 2, submit_refund: send the refund to WeChat Pay v3, with the number fixed at intake.

Ready: ``refund_order.submit_scanned = 0``, due, and not leased (idx_refund_order_submit_pending).
Does: POST /v3/refund/domestic/refunds (outside any transaction: the engine calls ``call``
between two short ones); on acceptance stores WeChat's refund id and status and writes
oplog REFUND_SUBMITTED.
Flips: ``submit_scanned=1, submit_success=1`` on acceptance; ``1/0`` on a proven refusal.

Unknown stays unknown. Leasing a row sets ``submit_sent = 1`` before its call. Once a number
may have reached WeChat (an earlier call whose outcome was not a proven refusal), only a
verified refund object ends the row: a later refusal (4xx) is checked by querying the number;
a refund found there is recorded as accepted, anything else is retried. An unknown outcome
(timeout, 5xx, 429, redirect, bad signature) keeps the row pending, retried with the SAME
out_refund_no, which WeChat refunds at most once; if it must end, it ends ``OUTCOME_UNKNOWN``,
never as a rejection.
Credentials refused (401, MCH_NOT_EXISTS) block the stage: no row is at fault.

Several refunds of one payment (partial cancels, a reissue): two applications of one payment go out
at least ``refund_spacing_seconds`` apart (WeChat Pay: a minute), decided in the lease's transaction
by a guarded write on the order (``goods_order2.refund_turn_at``, ``admit``), so two daemons cannot
both send one; the later one waits for its turn (next_attempt_at), no attempt spent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import Field
from sqlalchemy import Connection, Row, or_, select, update

import cancel_scanner.gateway.contract as gw
from cancel_scanner.engine.facts import Fact
from cancel_scanner.engine.logs import EventLog
from cancel_scanner.engine.outcome import OUTCOME_UNKNOWN, Blocked, Done, Failed, Outcome, Retry
from cancel_scanner.engine.settings import GatewayJobSettings, Seconds
from cancel_scanner.engine.sql import locked, update_rows
from cancel_scanner.engine.stage import Flags, StageDefaults, Wait
from cancel_scanner.gateway.channels import route
from cancel_scanner.models import goods_order2, refund_order
from cancel_scanner.scanners.parts import DEFAULT_REFUND_SPACING_SECONDS
from cancel_scanner.scanners.shop import refund_event, write_oplog

r = refund_order.c
MISMATCHED = Failed("MISMATCHED_ANSWER", "WeChat's answer names another refund or amount: check by hand")


BUSY_RETRY = timedelta(seconds=1)
# A turn is counted from the lease of the payment's previous application, which may leave a moment
# after it (the pacer's slot): this much more keeps the arrivals at WeChat the spacing apart.
SPACING_MARGIN = timedelta(seconds=2)


class SubmitSettings(GatewayJobSettings):
    """How far apart two first applications of refunds of one payment go out (WeChat Pay: a minute)."""

    refund_spacing_seconds: Annotated[Seconds, Field(ge=0)] = DEFAULT_REFUND_SPACING_SECONDS


def credentials_refused(result: gw.ConfigError) -> Blocked:
    return Blocked(
        result.code,
        f"WeChat Pay refused our credentials ({result.message}): check merchant key, serial number, mchid"
        " and this host's clock (more than 5 minutes off is refused)",
    )


def outcome_for(result: Any, *, may_have_reached: bool) -> Outcome:
    """The outcome for an answer that is not a verified refund object.

    ``may_have_reached``: the number may already exist at WeChat, so giving up must not say
    "rejected" but "unknown".
    """
    give_up_code = OUTCOME_UNKNOWN if may_have_reached else None
    if isinstance(result, gw.UnknownOutcome):
        return Retry(
            result.code,
            f"outcome unknown, will retry with the same number: {result.message}",
            give_up_code=OUTCOME_UNKNOWN,
        )
    if isinstance(result, gw.RetryLater):
        return Retry(result.code, result.message, give_up_after=result.give_up_after, give_up_code=give_up_code)
    if isinstance(result, gw.ConfigError):
        return credentials_refused(result)
    if isinstance(result, gw.Permanent):
        if may_have_reached:
            return Retry(
                result.code,
                f"refused, but an earlier call may have reached WeChat: {result.message}",
                give_up_code=OUTCOME_UNKNOWN,
            )
        return Failed(result.code, result.message)
    raise TypeError(f"unexpected gateway result {type(result).__name__}")


def matches(refund: gw.Refund, row: Row) -> bool:
    """A verified answer counts only if it is about this refund and this amount."""
    return refund.out_refund_no == row.out_refund_no and refund.refund_amount == row.refund_amount


@dataclass(frozen=True)
class Attempt:
    """One apply call's answer, whether an earlier call may have reached WeChat, and the check by query."""

    answer: gw.GatewayResult
    earlier: bool  # submit_sent was already 1 before this call's lease
    query: gw.GatewayResult | None = None  # asked when a refusal came for a number that may exist


# Answers that cannot be WeChat's answer to an application (a redirect, a body we cannot read, a
# signature that does not verify, an answer about another number): the refund may exist, so its
# number is queried at once instead of applying blind again.
NOT_AN_ANSWER = frozenset({"REDIRECT", "BAD_RESPONSE", "BAD_SIGNATURE", "ANSWER_TOO_LARGE", "RESPONSE_MISMATCH"})


def _is_refusal(result: Any) -> bool:
    return isinstance(result, (gw.Permanent, gw.RetryLater))


class SubmitRefund(StageDefaults):
    name = "submit_refund"
    kind = "gateway"
    # 1/0 here says "WeChat refused the refund": a refund it accepted never ends so, whatever fails here.
    fact_stays_pending = True
    settings = SubmitSettings
    endpoint = "apply"
    # submit_sent: set by the engine when the row is leased, before the call ("may have reached WeChat").
    flags = Flags.on(refund_order, "submit", leased=True, sent="submit_sent")
    feeds = ("poll_refund",)  # an accepted refund is that stage's, due after its first poll delay

    pending_since = r.created_at

    def __init__(
        self,
        first_poll_delay_seconds: float,
        max_attempts: int | None = None,
        refund_spacing_seconds: float = DEFAULT_REFUND_SPACING_SECONDS,
    ):
        self.first_poll_delay = timedelta(seconds=first_poll_delay_seconds)
        self.max_attempts = max_attempts  # its last try asks WeChat before the row is given up
        self.spacing = timedelta(seconds=refund_spacing_seconds)

    @classmethod
    def from_config(cls, config) -> SubmitRefund:
        (poll,) = cls.feeds
        job = config.job(cls.name)
        return cls(
            first_poll_delay_seconds=config.job(poll).poll_delays_seconds[0],
            max_attempts=job.max_attempts,
            refund_spacing_seconds=job.refund_spacing_seconds,
        )

    def handoffs(self) -> Mapping[str, float]:
        # The first poll is due that long after acceptance, which may come before its next tick.
        return {poll: self.first_poll_delay.total_seconds() for poll in self.feeds}

    def pending(self):
        return [r.submit_scanned == 0, r.submit_success == 0]

    def ready(self, now: datetime, limit: int):
        return (
            select(refund_order)
            .where(
                *self.pending(),
                or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now),
                or_(r.lease_until.is_(None), r.lease_until < now),
            )
            .order_by(r.next_attempt_at, r.id)
            .limit(limit)
        )

    def admit(self, conn: Connection, rows: Sequence[Row], now: datetime) -> tuple[list[Row], dict[int, Wait]]:
        """Every row but those of a payment with several refunds whose turn has not come: one application of
        such a payment at most every ``spacing`` (+ SPACING_MARGIN), counted from the last lease of any of
        its refunds, retries included (a lease released unsent, or a daemon killed before its call, may still
        have sent nothing: the time of its next lease is what counts).

        The turn is a guarded write on the order (``refund_turn_at``): two daemons, on one server or on two
        Galera nodes, cannot both take it (one waits for the row lock and finds it taken, or loses
        certification and its lease rolls back). Rows that took a turn are called first in their batch."""
        # A payment's only refund (a whole cancel's first) needs no turn; one of several does, whichever comes first.
        spaced = [row for row in rows if row.part or row.refund_seq > 1]
        waits: dict[int, Wait] = {}
        gap = self.spacing + SPACING_MARGIN
        if spaced and self.spacing:
            o = goods_order2.c
            order_ids = sorted({row.order_id for row in spaced})
            held = set(conn.execute(locked(conn, select(o.id).where(o.id.in_(order_ids)), skip_locked=True)).scalars())
            taken: set[int] = set()
            for row in sorted(spaced, key=lambda x: x.id):
                if row.order_id not in held:
                    waits[row.id] = Wait(now + BUSY_RETRY, "ORDER_BUSY: the order row is locked; will retry")
                    continue
                took = (
                    row.order_id not in taken
                    and conn.execute(
                        update(goods_order2)
                        .where(o.id == row.order_id, or_(o.refund_turn_at.is_(None), o.refund_turn_at <= now - gap))
                        .values(refund_turn_at=now)
                    ).rowcount
                )
                if took:
                    taken.add(row.order_id)
                    continue
                last = (
                    now
                    if row.order_id in taken
                    else conn.execute(select(o.refund_turn_at).where(o.id == row.order_id)).scalar_one()
                )
                waits[row.id] = Wait(
                    last + gap,
                    f"REFUND_SPACING: another refund of this payment went out at {last:%H:%M:%S};"
                    f" WeChat Pay wants {self.spacing.total_seconds():g} s between two",
                )
        leasing = [row.id for row in rows if row.id not in waits]
        if leasing:  # the latest moment each may go out: this lease
            conn.execute(update(refund_order).where(r.id.in_(leasing)).values(applied_at=now))
        turns = {row.id for row in spaced}
        return sorted((row for row in rows if row.id not in waits), key=lambda row: row.id not in turns), waits

    def not_sent(self, result: Any) -> bool:
        return isinstance(result, Attempt) and isinstance(result.answer, gw.NotSent)

    def call(self, gateway: gw.RefundGateway, row: Row, deadline: Callable[[], float]) -> Any:
        problem = gw.out_trade_no_problem(row.out_trade_no)
        if problem is not None and not row.submit_sent:
            # Never sent before, and WeChat refuses such a number: ends here, never sent. (One sent by an
            # older cancel-scanner goes on as before: only WeChat's record of it ends the row.)
            return Attempt(
                gw.Permanent("BAD_ORDER_NO", f"{problem}: never sent to WeChat Pay; check the order by hand"), False
            )
        gateway = route(gateway, row.channel)  # the refund's payment channel: its order's
        # Only out_trade_no, never also transaction_id: the body of every retry must be
        # byte-for-byte the body of the first try.
        result = gateway.apply(
            gw.RefundRequest(
                out_refund_no=row.out_refund_no,
                out_trade_no=row.out_trade_no,
                refund_amount=row.refund_amount,
                total_amount=row.total_amount,
                reason=row.reason,
            ),
            deadline=deadline,
        )
        earlier = bool(row.submit_sent)  # the row as claimed, before its lease set the mark
        if earlier and _is_refusal(result):
            # An earlier call may have been accepted: a refusal now (a replay WeChat handles
            # differently, a proxy's 4xx) proves nothing until WeChat's record says so.
            return Attempt(result, earlier, gateway.query(row.out_refund_no, deadline=deadline))
        if isinstance(result, gw.UnknownOutcome) and (result.code in NOT_AN_ANSWER or self._last_try(row)):
            # Unknown: ask WeChat's record of the number now, rather than apply blind again (or give up).
            return Attempt(result, True, gateway.query(row.out_refund_no, deadline=deadline))
        return Attempt(result, earlier)

    def _last_try(self, row: Row) -> bool:
        return self.max_attempts is not None and row.attempts + 1 >= self.max_attempts

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {"next_attempt_at": now + self.first_poll_delay}

    def channel_fact(self, row: Row, result: Any) -> Fact | None:
        """A refund WeChat accepted, kept if its write-back fails here (a shop rule refuses the oplog event)."""
        if not isinstance(result, Attempt):
            return None
        for answer in (result.answer, result.query):
            if isinstance(answer, gw.Accepted) and matches(answer.refund, row):
                refund = answer.refund
                return Fact(
                    "REFUND_ACCEPTED",
                    row.out_refund_no,
                    row.order_id,
                    f"refund accepted by WeChat Pay (refund_id {refund.refund_id})",
                )
        return None

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        accepted: dict[int, dict[str, Any]] = {}
        events = []
        blocked: Blocked | None = None
        for row, result in results:
            refund, request_id, outcome = self._judge(row, result)
            if refund is not None:
                accepted[row.id] = {"wx_refund_id": refund.refund_id, "wx_status": refund.status, "submitted_at": now}
                events.append(
                    (
                        row.order_id,
                        refund_event("REFUND_SUBMITTED", row.refund_seq),
                        f"{row.out_refund_no} {row.refund_amount} fen refund_id={refund.refund_id}",
                    )
                )
                EventLog(
                    stage=self.name,
                    row_id=row.id,
                    out_refund_no=row.out_refund_no,
                    action="accepted",
                    wx_status=refund.status,
                    request_id=request_id,
                ).info("refund accepted by WeChat Pay")
            if isinstance(outcome, Blocked):
                blocked = outcome
            outcomes[row.id] = outcome
        if blocked is not None:
            EventLog(stage=self.name, action="config_alert", code=blocked.code).error("{}", blocked.message)
        update_rows(conn, refund_order, accepted)
        write_oplog(conn, events)
        return outcomes

    def _judge(self, row: Row, attempt: Attempt) -> tuple[gw.Refund | None, str | None, Outcome]:
        """(the accepted refund or None, its Request-ID, the row's outcome)."""
        answer = attempt.answer
        if isinstance(answer, gw.Accepted):
            if not matches(answer.refund, row):
                return None, None, MISMATCHED
            return answer.refund, answer.request_id, Done(answer.refund.status)
        if attempt.query is not None:
            return self._judge_checked(row, answer, attempt.query)
        return None, None, outcome_for(answer, may_have_reached=attempt.earlier)

    def _judge_checked(self, row: Row, refusal: Any, query: Any) -> tuple[gw.Refund | None, str | None, Outcome]:
        log = EventLog(stage=self.name, row_id=row.id, out_refund_no=row.out_refund_no, refusal=refusal.code)
        if isinstance(query, gw.Accepted):
            if not matches(query.refund, row):
                return None, None, MISMATCHED
            if isinstance(refusal, gw.UnknownOutcome):
                log.bind(action="unknown_resolved", wx_status=query.refund.status).info(
                    "the application's answer was unknown; WeChat's record shows the refund accepted: recorded as accepted"
                )
            else:
                log.bind(action="refusal_overruled", wx_status=query.refund.status).warning(
                    "WeChat refused a replay, but its record shows the refund accepted: recorded as accepted"
                )
            return query.refund, query.request_id, Done(query.refund.status)
        if isinstance(query, gw.ConfigError):
            return None, None, credentials_refused(query)
        # Even "no such refund" is not proof: WeChat's own replication lags behind an acceptance.
        # Only a verified refund object ends this row; giving up says "unknown", not "rejected".
        said = (
            "unknown"
            if isinstance(refusal, gw.UnknownOutcome)
            else "refused after an earlier call may have reached WeChat"
        )
        return (
            None,
            None,
            Retry(
                refusal.code,
                f"{said}, and the query answered {getattr(query, 'code', type(query).__name__)}: will ask again ({refusal.message})",
                give_up_code=OUTCOME_UNKNOWN,
            ),
        )
