"""Stage 3, poll_refund: follow an accepted refund until WeChat says SUCCESS or CLOSED.

Ready: ``submit_success = 1, progress_scanned = 0``, due, not leased (idx_refund_order_poll_pending).
Does: GET /v3/refund/domestic/refunds/{out_refund_no}, outside any transaction.
Flips: ``progress_scanned=1, progress_success=1`` on SUCCESS; ``1/0`` on CLOSED.
PROCESSING and ABNORMAL stay pending and are polled again on the configured schedule;
ABNORMAL is written on the row as needing a merchant's action.

A status WeChat proved once is not overwritten by a contradicting one: a refund whose
verified answer said SUCCESS and a later one says PROCESSING or CLOSED ends ``1/0`` with
``CONFLICTING_ANSWERS``, for a person, and its order is never marked "no money moved".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Row, case, func, literal, not_, or_, select, update

import cancel_scanner.gateway.contract as gw
from cancel_scanner.engine.facts import Fact
from cancel_scanner.engine.logs import EventLog
from cancel_scanner.engine.outcome import Done, Failed, Later, Outcome
from cancel_scanner.engine.settings import Delays, GatewayJobSettings
from cancel_scanner.engine.sql import update_rows
from cancel_scanner.engine.stage import Flags, StageDefaults
from cancel_scanner.gateway.channels import route
from cancel_scanner.i18n import N_
from cancel_scanner.models import refund_order
from cancel_scanner.scanners.submit_refund import MISMATCHED, matches, outcome_for

r = refund_order.c
ABNORMAL_NOTE = "ABNORMAL: the user's bank card or account is frozen or closed; the merchant must act"
CONFLICTING_ANSWERS = "CONFLICTING_ANSWERS"
DEFAULT_POLL_DELAYS_SECONDS = (60.0, 300.0, 600.0, 1200.0, 1800.0)  # about a minute after applying, then back off


def next_poll_at(submitted_at: datetime | None, now: datetime, delays: Sequence[float]) -> datetime:
    """The first point of the schedule (cumulative delays after acceptance) later than ``now``.

    Stateless: it needs no counter on the row, and a daemon restart keeps the schedule.
    """
    start = submitted_at or now
    for offset in accumulate(delays):
        at = start + timedelta(seconds=offset)
        if at > now:
            return at
    # Past the schedule: the last delay repeats.
    return now + timedelta(seconds=delays[-1])


class PollSettings(GatewayJobSettings):
    """The polling schedule: the first value is the wait after acceptance, the last repeats."""

    poll_delays_seconds: Delays = DEFAULT_POLL_DELAYS_SECONDS


class PollRefund(StageDefaults):
    name = "poll_refund"
    oldest_pending_alert_seconds = 3 * 86_400  # a refund to a bank card takes days
    kind = "gateway"
    settings = PollSettings
    feeds = ("sync_result",)
    failed_note = None
    endpoint = "query"
    takes_notifications = True  # WeChat's refund notifications bring this stage's next poll forward
    flags = Flags.on(refund_order, "progress", leased=True)

    def __init__(self, poll_delays_seconds: Sequence[float]):
        self.poll_delays = tuple(poll_delays_seconds)

    @classmethod
    def from_config(cls, config) -> PollRefund:
        return cls(config.job(cls.name).poll_delays_seconds)

    def poll_soon(self, conn: Connection, out_refund_no: str, now: datetime) -> int:
        """A refund notification arrived: make that refund due for polling now (0 or 1 rows).

        The notification itself changes no money state: this stage reads the refund from WeChat
        and stays its only writer, so a forged or replayed notification can at most cause one
        extra query.
        """
        moved = conn.execute(
            update(refund_order).where(r.out_refund_no == out_refund_no, *self.pending()).values(next_attempt_at=now)
        ).rowcount
        logger.bind(stage=self.name, action="poll_soon", out_refund_no=out_refund_no, rows=moved).info(
            "refund notification"
        )
        return moved

    def status_counts(self, conn: Connection, now: datetime):
        abnormal = conn.execute(
            select(func.count()).select_from(refund_order).where(*self.pending(), r.wx_status == "ABNORMAL")
        ).scalar_one()
        return (("abnormal_refunds", N_("ABNORMAL refunds needing the merchant's action"), abnormal),)

    def attention(self, conn: Connection, limit: int):
        found = (
            conn.execute(
                select(r.id, r.order_id, r.out_refund_no, r.refund_amount, r.submitted_at)
                .where(*self.pending(), r.wx_status == "ABNORMAL")
                .order_by(r.id)
                .limit(limit)
            )
            .mappings()
            .all()
        )
        return (("abnormal_refunds", "ABNORMAL refunds needing the merchant's action", found),)

    pending_since = r.submitted_at
    index_prefix = (r.submit_success == 1,)  # lets `status` count on idx_refund_order_poll_pending
    # A CLOSED refund a person reissued (cancel-scanner reissue) needs nobody any more.
    still_failing = (or_(r.last_error.is_(None), not_(r.last_error.like("REISSUED%"))),)

    def pending(self):
        return [r.submit_success == 1, r.progress_scanned == 0, r.progress_success == 0]

    def ready(self, now: datetime, limit: int):
        return (
            select(refund_order)
            .where(
                *self.pending(),
                r.next_attempt_at <= now,
                or_(r.lease_until.is_(None), r.lease_until < now),
            )
            .order_by(r.next_attempt_at, r.id)
            .limit(limit)
        )

    def call(self, gateway: gw.RefundGateway, row: Row, deadline: Callable[[], float]) -> gw.GatewayResult:
        return route(gateway, row.channel).query(row.out_refund_no, deadline=deadline)

    def not_sent(self, result: Any) -> bool:
        return isinstance(result, gw.NotSent)

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {}

    def failed_reason(self) -> Any:
        # sync_result clears last_error when it writes a CLOSED refund to its order: the reason is then
        # wx_status (as v_cancel_scanner_failed says it, on SQLite too).
        closed = literal("REFUND_CLOSED: WeChat closed refund ") + r.out_refund_no + literal("; no money moved")
        return func.coalesce(r.last_error, case((r.wx_status == "CLOSED", closed)))

    def channel_fact(self, row: Row, result: Any) -> Fact | None:
        """A refund's end WeChat reported, kept if it cannot be written here."""
        if (
            isinstance(result, gw.Accepted)
            and matches(result.refund, row)
            and result.refund.status in gw.FINAL_STATUSES
        ):
            return Fact(
                f"REFUND_{result.refund.status}",
                row.out_refund_no,
                row.order_id,
                f"refund {result.refund.status} at WeChat Pay",
            )
        return None

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        seen: dict[int, dict[str, Any]] = {}
        for row, result in results:
            if not isinstance(result, gw.Accepted):
                # A query moves no money, so an unknown answer is just asked again.
                outcomes[row.id] = outcome_for(result, may_have_reached=False)
                continue
            refund = result.refund
            if not matches(refund, row):
                # Never record a success for money we did not ask to move.
                outcomes[row.id] = MISMATCHED
                continue
            log = EventLog(stage=self.name, row_id=row.id, out_refund_no=row.out_refund_no, wx_status=refund.status)
            if row.wx_status == "SUCCESS" and refund.status != "SUCCESS":
                outcomes[row.id] = Failed(
                    CONFLICTING_ANSWERS,
                    f"WeChat said SUCCESS for {row.out_refund_no}, now says {refund.status}: check the refund by hand",
                )
                log.bind(action="conflict").error("WeChat contradicts itself about this refund")
                continue  # wx_status keeps what was proven first
            seen[row.id] = {"wx_status": refund.status, "success_time": refund.success_time}
            if refund.status == "SUCCESS":
                outcomes[row.id] = Done("SUCCESS")
                log.bind(action="succeeded").info("refund succeeded: money returned")
            elif refund.status == "CLOSED":
                outcomes[row.id] = Failed("REFUND_CLOSED", f"WeChat closed refund {row.out_refund_no}; no money moved")
                log.bind(action="closed").warning("refund closed by WeChat Pay")
            elif refund.status == "ABNORMAL":
                outcomes[row.id] = Later(next_poll_at(row.submitted_at, now, self.poll_delays), ABNORMAL_NOTE)
                log.bind(action="abnormal").warning("refund ABNORMAL: needs the merchant's action")
            else:
                outcomes[row.id] = Later(next_poll_at(row.submitted_at, now, self.poll_delays))
        update_rows(conn, refund_order, seen)
        return outcomes
