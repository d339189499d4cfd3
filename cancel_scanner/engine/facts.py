"""What a payment channel did, kept when it could not be written where it belongs.

A gateway stage's answer is written back in one transaction with the shop's rows. When the shop's
database refuses that write for one row (a trigger, a constraint), the channel has still closed the
trade or accepted the refund: the fact goes to ``channel_fact``, a table of ours no shop rule
touches, in the same pass, and stays open until the row's stage records it the ordinary way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from loguru import logger
from sqlalchemy import Connection, func, insert, select, update

from cancel_scanner.engine.outcome import clip
from cancel_scanner.models import channel_fact

f = channel_fact.c


@dataclass(frozen=True)
class Fact:
    """One thing the channel did: ``fact`` (PAYMENT_CLOSED, REFUND_ACCEPTED, ...), about ``number``."""

    fact: str
    number: str
    order_id: int | None
    detail: str  # for a person: "closed at WeChat Pay", "refund 5030... of 1280 fen accepted by WeChat Pay"


def record_fact(conn: Connection, stage: str, row_id: int, fact: Fact, reason: str, now: datetime) -> None:
    """Insert or refresh the open fact of (stage, row). The caller holds the row (its lease)."""
    values = {
        "fact": fact.fact,
        "number": fact.number,
        "order_id": fact.order_id,
        "detail": clip(fact.detail),
        "reason": clip(reason),
        "last_seen_at": now,
        "resolved_at": None,
    }
    seen = conn.execute(select(f.id, f.times_seen).where(f.stage == stage, f.row_id == row_id)).first()
    if seen is None:
        conn.execute(insert(channel_fact).values(stage=stage, row_id=row_id, first_seen_at=now, times_seen=1, **values))
    else:
        conn.execute(update(channel_fact).where(f.id == seen.id).values(times_seen=seen.times_seen + 1, **values))
    logger.bind(stage=stage, row_id=row_id, action="fact_kept", fact=fact.fact, number=fact.number).warning(
        "{}; kept in channel_fact until it is recorded here", fact.detail
    )


def resolve_facts(conn: Connection, stage: str, row_ids: Iterable[int], now: datetime) -> int:
    """The rows' stage has recorded them now: their open facts are closed."""
    ids = sorted(set(row_ids))
    if not ids:
        return 0
    return (
        conn.execute(
            update(channel_fact)
            .where(f.stage == stage, f.row_id.in_(ids), f.resolved_at.is_(None))
            .values(resolved_at=now)
        ).rowcount
        or 0
    )


def open_facts(conn: Connection) -> int:
    """How many facts the channel made that are not recorded here yet (for `status`), on idx_channel_fact_open."""
    return conn.execute(select(func.count()).select_from(channel_fact).where(f.resolved_at.is_(None))).scalar_one()
