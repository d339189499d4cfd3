"""Operator action: give rows that failed for good (``1/0``) another go, after a person fixed the cause.

Safe for every stage because every stage is idempotent: a requeued submit_refund sends the
same out_refund_no, which WeChat refunds at most once.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Engine, update

from cancel_scanner.engine.outcome import clip
from cancel_scanner.engine.stage import Stage


def requeue(db: Engine, stage: Stage, row_ids: Iterable[int], now: datetime, who: str) -> int:
    """Turn ``1/0`` rows of ``stage`` back into pending; returns how many were requeued."""
    flags = stage.flags
    ids = sorted(set(row_ids))
    if not ids:
        return 0
    with db.begin() as conn:
        return conn.execute(
            update(flags.table)
            .where(flags.id.in_(ids), *stage.index_prefix, flags.scanned == 1, flags.success == 0)
            .values(
                {
                    flags.scanned: 0,
                    flags.attempts: 0,
                    flags.next_attempt_at: now,
                    flags.last_error: clip(f"requeued by {who}"),
                }
            )
        ).rowcount
