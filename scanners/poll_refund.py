"""Stage 3, poll_refund: follow an accepted refund until WeChat says SUCCESS or CLOSED.

Ready: ``submit_success = 1, progress_scanned = 0``, due, not leased (idx_refund_order_poll_pending).
Does: GET /v3/refund/domestic/refunds/{out_refund_no}, outside any transaction.
Flips: ``progress_scanned=1, progress_success=1`` on SUCCESS; ``1/0`` on CLOSED.
PROCESSING and ABNORMAL stay pending and are polled again on the configured schedule;
ABNORMAL is written on the row as needing a merchant's action.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any, Mapping, Sequence

from loguru import logger
from sqlalchemy import Connection, Row, or_, select

import gateway.contract as gw
from engine.outcome import Done, Failed, Later, Outcome
from engine.sql import update_rows
from engine.stage import Flags, StageDefaults
from models import refund_order
from scanners.submit_refund import classify

r = refund_order.c
ABNORMAL_NOTE = "ABNORMAL: the user's bank card or account is frozen or closed; the merchant must act"


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


class PollRefund(StageDefaults):
    name = "poll_refund"
    flags = Flags(
        table=refund_order,
        scanned=r.progress_scanned,
        success=r.progress_success,
        attempts=r.attempts,
        next_attempt_at=r.next_attempt_at,
        last_error=r.last_error,
        lease_owner=r.lease_owner,
        lease_until=r.lease_until,
    )

    def __init__(self, poll_delays_seconds: Sequence[float]):
        self.poll_delays = tuple(poll_delays_seconds)

    pending_since = r.submitted_at
    index_prefix = (r.submit_success == 1,)  # lets `status` count on idx_refund_order_poll_pending

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

    def call(self, gateway: gw.RefundGateway, row: Row) -> gw.GatewayResult:
        return gateway.query(row.out_refund_no)

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {}

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        seen: dict[int, dict[str, Any]] = {}
        for row, result in results:
            if not isinstance(result, gw.Accepted):
                outcome = classify(result)
                if outcome is None:
                    raise TypeError(f"unexpected gateway result {type(result).__name__}")
                outcomes[row.id] = outcome
                continue
            refund = result.refund
            if refund.out_refund_no != row.out_refund_no or refund.refund_amount != row.refund_amount:
                # Never record a success for money we did not ask to move.
                outcomes[row.id] = Failed("MISMATCHED_ANSWER", "WeChat's answer names another refund or amount: check by hand")
                continue
            seen[row.id] = {"wx_status": refund.status, "success_time": refund.success_time}
            log = logger.bind(stage=self.name, row_id=row.id, out_refund_no=row.out_refund_no, wx_status=refund.status)
            if refund.status == "SUCCESS":
                outcomes[row.id] = Done("SUCCESS")
                log.bind(action="succeeded").info("refund succeeded: money returned")
            elif refund.status == "CLOSED":
                outcomes[row.id] = Failed("REFUND_CLOSED", "WeChat closed the refund: no money moved")
                log.bind(action="closed").warning("refund closed by WeChat Pay")
            elif refund.status == "ABNORMAL":
                outcomes[row.id] = Later(next_poll_at(row.submitted_at, now, self.poll_delays), ABNORMAL_NOTE)
                log.bind(action="abnormal").warning("refund ABNORMAL: needs the merchant's action")
            else:
                outcomes[row.id] = Later(next_poll_at(row.submitted_at, now, self.poll_delays))
        update_rows(conn, refund_order, seen)
        return outcomes
