"""What `cancel-scanner status` shows: per stage, pending / waiting / failed / done / oldest pending.

Every figure is one query that an index of sql/schema.sql serves: the stages'
indexes lead with their flag columns (and ``index_prefix``), so counting done
and failed rows reads the index only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Mapping

from sqlalchemy import Connection, Engine, func, select

from cancel_scanner.engine.stage import Stage


@dataclass(frozen=True)
class StageStatus:
    stage: str
    pending: int  # rows the stage will still act on: due now, or waiting
    waiting: int  # of those, not due yet (a retry after a failure, or the next poll)
    failed: int  # X_scanned=1, X_success=0: an operator must look
    done: int  # X_scanned=1, X_success=1
    oldest_pending_seconds: float | None


@dataclass(frozen=True)
class Status:
    now: datetime
    stages: tuple[StageStatus, ...]
    # Figures the stages add (key, label, count): e.g. abnormal_refunds, ABNORMAL refunds needing
    # the merchant's action.
    counts: tuple[tuple[str, str, int], ...] = ()
    failed_notes: tuple[tuple[str, str], ...] = ()  # (stage, how its 1/0 rows read), for stages that say

    @property
    def abnormal_refunds(self) -> int:
        return sum(n for key, _label, n in self.counts if key == "abnormal_refunds")

    def as_dict(self) -> dict:
        return {
            "now": self.now.isoformat(),
            "stages": {s.stage: {k: v for k, v in asdict(s).items() if k != "stage"} for s in self.stages},
            **{key: n for key, _label, n in self.counts},
        }


def _count(conn: Connection, table, *where) -> int:
    return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def stage_status(conn: Connection, stage: Stage, now: datetime) -> StageStatus:
    flags = stage.flags
    table = flags.table
    pending = stage.pending()
    oldest = conn.execute(select(func.min(stage.pending_since)).where(*pending)).scalar()
    if isinstance(oldest, str):  # SQLite hands back text for an aggregate
        oldest = datetime.fromisoformat(oldest)
    return StageStatus(
        stage=stage.name,
        pending=_count(conn, table, *pending),
        waiting=_count(conn, table, *pending, flags.next_attempt_at > now),
        failed=_count(conn, table, *stage.index_prefix, flags.scanned == 1, flags.success == 0),
        done=_count(conn, table, *stage.index_prefix, flags.scanned == 1, flags.success == 1),
        oldest_pending_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
    )


def collect_status(db: Engine, stages: Mapping[str, Stage], now: datetime) -> Status:
    with db.connect() as conn:
        per_stage = tuple(stage_status(conn, stage, now) for stage in stages.values())
        counts = tuple(c for stage in stages.values() for c in stage.status_counts(conn))
    notes = tuple((s.name, s.failed_note) for s in stages.values() if s.failed_note)
    return Status(now=now, stages=per_stage, counts=counts, failed_notes=notes)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_status(status: Status) -> str:
    lines = [f"{'stage':16} {'pending':>8} {'waiting':>8} {'failed':>8} {'done':>10}  oldest pending"]
    for s in status.stages:
        lines.append(
            f"{s.stage:16} {s.pending:8d} {s.waiting:8d} {s.failed:8d} {s.done:10d}  {format_age(s.oldest_pending_seconds)}"
        )
    for _key, label, n in status.counts:
        if n:
            lines.append(f"{label}: {n}")
    noted = dict(status.failed_notes)
    for s in status.stages:
        if s.failed and s.stage in noted:
            lines.append(f"{s.stage} failed = {s.failed} {noted[s.stage]}")
    failed = sum(s.failed for s in status.stages if s.stage not in noted)
    if failed:
        lines.append(
            f"{failed} row(s) failed for good and need a person: their reason is in last_error"
            " (on MySQL, SELECT * FROM v_cancel_scanner_failed)"
        )
    return "\n".join(lines)
