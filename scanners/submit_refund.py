"""Stage 2, submit_refund: send the refund to WeChat Pay v3, with the number fixed at intake.

Ready: ``refund_order.submit_scanned = 0``, due, and not leased (idx_refund_order_submit_pending).
Does: POST /v3/refund/domestic/refunds (outside any transaction: the engine calls ``call``
between two short ones); on acceptance stores WeChat's refund id and status and writes
oplog REFUND_SUBMITTED.
Flips: ``submit_scanned=1, submit_success=1`` on acceptance; ``1/0`` on a permanent refusal.
An unknown outcome (timeout, 5xx, 429, bad signature) or "retry later" (NOT_ENOUGH) keeps the
row pending, to be retried with the SAME out_refund_no: WeChat refunds a number at most once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from loguru import logger
from sqlalchemy import Connection, Row, or_, select

import gateway.contract as gw
from engine.outcome import Done, Failed, Outcome, Retry
from engine.sql import update_rows, write_oplog
from engine.stage import Flags, StageDefaults
from models import refund_order

r = refund_order.c


def classify(result: Any) -> Outcome | None:
    """The engine's outcome for a gateway answer that is not an acceptance."""
    if isinstance(result, gw.UnknownOutcome):
        return Retry(result.code, f"outcome unknown, will retry with the same number: {result.message}")
    if isinstance(result, gw.RetryLater):
        return Retry(result.code, result.message, give_up_after=result.give_up_after)
    if isinstance(result, gw.ConfigError):
        # Keys, serial or clock are wrong: every call will fail the same way until a person fixes it.
        logger.bind(action="config_alert", code=result.code).error(
            "WeChat Pay rejected our credentials ({}): check merchant key, serial number, mchid and clock",
            result.code,
        )
        return Failed(result.code, result.message)
    if isinstance(result, gw.Permanent):
        return Failed(result.code, result.message)
    return None


class SubmitRefund(StageDefaults):
    name = "submit_refund"
    flags = Flags(
        table=refund_order,
        scanned=r.submit_scanned,
        success=r.submit_success,
        attempts=r.attempts,
        next_attempt_at=r.next_attempt_at,
        last_error=r.last_error,
        lease_owner=r.lease_owner,
        lease_until=r.lease_until,
    )

    pending_since = r.created_at

    def __init__(self, first_poll_delay_seconds: float):
        self.first_poll_delay = timedelta(seconds=first_poll_delay_seconds)

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

    def call(self, gateway: gw.RefundGateway, row: Row) -> gw.GatewayResult:
        # Only out_trade_no, never also transaction_id: the body of every retry must be
        # byte-for-byte the body of the first try.
        return gateway.apply(
            gw.RefundRequest(
                out_refund_no=row.out_refund_no,
                out_trade_no=row.out_trade_no,
                refund_amount=row.refund_amount,
                total_amount=row.total_amount,
                reason=row.reason,
            )
        )

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {"next_attempt_at": now + self.first_poll_delay}

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        accepted: dict[int, dict[str, Any]] = {}
        events = []
        for row, result in results:
            if isinstance(result, gw.Accepted):
                refund = result.refund
                if refund.out_refund_no != row.out_refund_no or refund.refund_amount != row.refund_amount:
                    outcomes[row.id] = Failed(
                        "MISMATCHED_ANSWER", "WeChat's answer names another refund or amount: check by hand"
                    )
                    continue
                accepted[row.id] = {"wx_refund_id": refund.refund_id, "wx_status": refund.status, "submitted_at": now}
                events.append(
                    (row.order_id, "REFUND_SUBMITTED", f"{row.out_refund_no} {row.refund_amount} fen refund_id={refund.refund_id}")
                )
                outcomes[row.id] = Done(refund.status)
                logger.bind(
                    stage=self.name, row_id=row.id, out_refund_no=row.out_refund_no, action="accepted",
                    wx_status=refund.status, request_id=result.request_id,
                ).info("refund accepted by WeChat Pay")
            else:
                outcome = classify(result)
                if outcome is None:
                    raise TypeError(f"unexpected gateway result {type(result).__name__}")
                outcomes[row.id] = outcome
        update_rows(conn, refund_order, accepted)
        write_oplog(conn, events)
        return outcomes
