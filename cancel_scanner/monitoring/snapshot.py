"""One reading of the database for the gauges, the alert rules and the status page.

Taken on the daemon's own schedule (``monitoring.refresh_seconds``), never per scrape or page
view. Every query is bounded by the backlog or by a LIMIT, never by the finished rows: the
stages' cheap `status` figures, up to ``LIST_LIMIT`` failed rows per stage (a person's work list),
the latest rejected merchant requests, what the stages add (the ABNORMAL refunds), and the oldest
things the payment channel did that are not recorded here yet (channel_fact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, func, select

from cancel_scanner.engine.status import CHANNEL_FACTS, Status, collect_status
from cancel_scanner.models import channel_fact

LIST_LIMIT = 20
# What a rejected merchant request shows, of the columns its table has.
REQUEST_COLUMNS = (
    "id",
    "order_id",
    "op_type",
    "quantity",
    "operator",
    "reason",
    "result_code",
    "result_msg",
    "created_at",
)


@dataclass(frozen=True)
class Listing:
    key: str  # "failed:<stage>", "rejected", or a stage's own (e.g. "abnormal_refunds")
    label: str
    # Rows by column name: SQLAlchemy's RowMappings (whose key type is wider than str) or a stage's own.
    rows: tuple[Mapping[Any, Any], ...]
    stage: str | None = None


@dataclass(frozen=True)
class Snapshot:
    status: Status
    listings: tuple[Listing, ...] = ()
    leases_held: int = 0
    clock_offset: float | None = None
    taken_at: float = 0.0  # wall clock, epoch seconds
    leader: bool = True  # this process is the first running daemon: it alerts on database-wide rules
    extra: dict[str, Any] = field(default_factory=dict)

    def listing(self, key: str) -> Listing | None:
        return next((item for item in self.listings if item.key == key), None)

    def failed(self, stage: str) -> int:
        return next((s.failed for s in self.status.stages if s.stage == stage), 0)


def _failed_rows(conn: Connection, stage: Any, limit: int) -> tuple[RowMapping, ...]:
    flags, table = stage.flags, stage.flags.table
    if stage.rejections_are_routine:
        columns = [table.c[name] for name in REQUEST_COLUMNS if name in table.c]
        order = table.c.id.desc()  # the latest rejections first
    else:
        columns = [
            table.c.id,
            table.c.order_id if "order_id" in table.c else table.c.id.label("order_id"),
            flags.attempts.label("attempts"),
            stage.failed_reason().label("last_error"),
            table.c.updated_at,
        ]
        order = table.c.id
    query = (
        select(*columns)
        .where(*stage.index_prefix, flags.scanned == 1, flags.success == 0, *stage.still_failing)
        .order_by(order)
        .limit(limit)
    )
    return tuple(conn.execute(query).mappings().all())


def listings(conn: Connection, stages: Mapping[str, Any], limit: int = LIST_LIMIT) -> tuple[Listing, ...]:
    out: list[Listing] = []
    for name, stage in stages.items():
        rows = _failed_rows(conn, stage, limit)
        if stage.rejections_are_routine:
            out.append(Listing("rejected", "Latest rejected requests", rows, name))
        else:
            out.append(Listing(f"failed:{name}", f"{name}: rows that need a person", rows, name))
        for key, label, found in stage.attention(conn, limit):
            out.append(Listing(key, label, tuple(found), name))
    f = channel_fact.c  # the oldest first, on idx_channel_fact_open
    facts = (
        conn.execute(
            select(f.stage, f.row_id, f.fact, f.number, f.detail, f.reason, f.last_seen_at)
            .where(f.resolved_at.is_(None))
            .order_by(f.last_seen_at)
            .limit(limit)
        )
        .mappings()
        .all()
    )
    out.append(Listing(CHANNEL_FACTS, "Done at the payment channel, not recorded here yet", tuple(facts)))
    return tuple(out)


def take_snapshot(
    db: Engine,
    stages: Mapping[str, Any],
    now: datetime,
    *,
    takeover_seconds: float,
    owner: str | None = None,
    lease_columns: Sequence[tuple[Any, Any]] = (),
    wall_now: float,
) -> Snapshot:
    """``now``: the database's time; ``owner``: this process's lease owner (its leases are counted)."""
    status = collect_status(db, stages, now, takeover_seconds=takeover_seconds)
    with db.connect() as conn:
        found = listings(conn, stages)
        held = 0
        if owner is not None:
            counted = [owner_col for owner_col, _until in lease_columns]
            for stage in stages.values():  # a leased row belongs to one stage: the one whose flags are 0/0
                if stage.flags.lease_owner is not None and any(stage.flags.lease_owner is col for col in counted):
                    held += conn.execute(
                        select(func.count()).select_from(stage.flags.table).where(*stage.leased_by(owner))
                    ).scalar_one()
    leader = not status.owners or owner is None or status.owners[0] == owner
    return Snapshot(status=status, listings=found, leases_held=held, taken_at=wall_now, leader=leader)
