"""What `cancel-scanner status` shows: per stage, pending / waiting / failed / oldest pending, its
state on the running daemons, and the rows they finished.

Every figure is cheap on a large table: pending rows are read on the stages' pending indexes, and
failed rows (``1/0``, a person's work list) on the index their flags lead. Finished rows are not
counted: "done" is what the running daemons report with their heartbeats (rows finished since they
started). ``totals=True`` (``status --totals``) counts every finished row in the tables instead,
which reads a whole index: seconds on a table of millions, not for a scrape or a loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, case, func, select

from cancel_scanner.engine.facts import open_facts
from cancel_scanner.engine.progress import read_report
from cancel_scanner.engine.registry import DEFAULT_TAKEOVER_SECONDS
from cancel_scanner.engine.stage import Stage
from cancel_scanner.i18n import N_, pad, render, tr
from cancel_scanner.models import reconcile_run, scanner_process

CHANNEL_FACTS = "channel_facts_open"  # what a payment channel did that is not recorded here yet


@dataclass(frozen=True)
class StageDown:
    daemon: str  # hostname:pid
    seconds: float
    reason: str | None


@dataclass(frozen=True)
class StageStatus:
    stage: str
    pending: int  # rows the stage will still act on: due now, or waiting
    waiting: int  # of those, not due yet (a retry after a failure, or the next poll)
    failed: int  # X_scanned=1, X_success=0: an operator must look
    oldest_pending_seconds: float | None
    done_by_daemons: int = 0  # rows the running daemons finished (done) since they started
    daemons: int = 0  # running daemons that run this stage
    down: tuple[StageDown, ...] = ()  # those on which it backs off now
    done: int | None = None  # every X_scanned=1, X_success=1 row: counted only with totals=True

    @property
    def up(self) -> bool | None:
        """True when every running daemon runs it, False when one backs it off, None when none runs it."""
        if not self.daemons:
            return None
        return not self.down


@dataclass(frozen=True)
class Status:
    now: datetime
    stages: tuple[StageStatus, ...]
    # Figures the stages add (key, label, count): e.g. abnormal_refunds, ABNORMAL refunds needing
    # the merchant's action.
    counts: tuple[tuple[str, str, int], ...] = ()
    counted_by: tuple[tuple[str, str], ...] = ()  # (key, the stage that counts it)
    failed_notes: tuple[tuple[str, str], ...] = ()  # (stage, how its 1/0 rows read), for stages that say
    daemons: tuple[str, ...] = field(default=())  # hostname:pid of each running daemon
    owners: tuple[str, ...] = field(default=(), repr=False)  # their lease owner ids, oldest registration first
    totals: bool = False
    reconcile: dict | None = None  # the latest reconciled day: bill_date, state, diffs, last_error

    @property
    def channel_facts_open(self) -> int:
        return sum(n for key, _label, n in self.counts if key == CHANNEL_FACTS)

    def stage_counting(self, key: str) -> str | None:
        """The stage whose rows a figure of ``counts`` counts (None: the engine's own)."""
        return next((stage for k, stage in self.counted_by if k == key), None)

    @property
    def abnormal_refunds(self) -> int:
        return self.count("abnormal_refunds")

    def count(self, key: str) -> int:
        """A figure of ``counts`` by its key (0 when no stage counts it)."""
        return sum(n for k, _label, n in self.counts if k == key)

    @property
    def down(self) -> tuple[StageStatus, ...]:
        return tuple(s for s in self.stages if s.down)

    def as_dict(self) -> dict:
        def stage(s: StageStatus) -> dict:
            out = {k: v for k, v in asdict(s).items() if k not in ("stage", "down", "done")}
            out["up"] = s.up
            out["down"] = [asdict(d) for d in s.down]
            if self.totals:
                out["done"] = s.done
            return out

        return {
            "now": self.now.isoformat(),
            "daemons": list(self.daemons),
            "stages": {s.stage: stage(s) for s in self.stages},
            **{key: n for key, _label, n in self.counts},
            "reconcile": self.reconcile,
        }


def _count(conn: Connection, table, *where) -> int:
    return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def _as_datetime(value):
    if isinstance(value, str):  # SQLite hands back text for an aggregate
        return datetime.fromisoformat(value)
    return value


def stage_status(conn: Connection, stage: Stage, now: datetime, *, totals: bool = False) -> StageStatus:
    flags = stage.flags
    table = flags.table
    # One pass over the pending rows: how many, how many not due yet, and the oldest.
    pending, waiting, oldest = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((flags.next_attempt_at > now, 1), else_=0)), 0),
            func.min(stage.pending_since),
        )
        .select_from(table)
        .where(*stage.pending())
    ).one()
    oldest = _as_datetime(oldest)
    return StageStatus(
        stage=stage.name,
        pending=int(pending),
        waiting=int(waiting),
        failed=_count(conn, table, *stage.index_prefix, flags.scanned == 1, flags.success == 0, *stage.still_failing),
        oldest_pending_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
        done=_count(conn, table, *stage.index_prefix, flags.scanned == 1, flags.success == 1) if totals else None,
    )


def running_daemons(conn: Connection, now: datetime, takeover_seconds: float) -> list[tuple[str, str, dict]]:
    """(hostname:pid, owner, its report's stages) of every process that beat within takeover_seconds.

    A down stage's ``down_for`` is brought up to ``now`` by the heartbeat's age (both database time)."""
    p = scanner_process.c
    cutoff = now - timedelta(seconds=takeover_seconds)
    found = conn.execute(
        select(p.hostname, p.pid, p.owner, p.report, p.heartbeat_at).where(p.heartbeat_at >= cutoff).order_by(p.id)
    ).all()
    out = []
    for row in found:
        report = read_report(row.report)
        age = max(0.0, (now - _as_datetime(row.heartbeat_at)).total_seconds())
        for st in report.values():
            if st["down_for"] is not None:
                st["down_for"] += age
        out.append((f"{row.hostname}:{row.pid}", row.owner, report))
    return out


def _with_daemons(s: StageStatus, daemons: list[tuple[str, str, dict]]) -> StageStatus:
    runs = [(name, report[s.stage]) for name, _owner, report in daemons if s.stage in report]
    down = tuple(StageDown(name, st["down_for"] or 0.0, st["reason"]) for name, st in runs if not st["up"])
    return StageStatus(
        **{**asdict(s), "down": down, "daemons": len(runs), "done_by_daemons": sum(st["done"] for _n, st in runs)}
    )


def collect_status(
    db: Engine,
    stages: Mapping[str, Stage],
    now: datetime,
    *,
    totals: bool = False,
    takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS,
) -> Status:
    """``now`` is the database's time: pending ages, who is alive, how long a stage has been down."""
    with db.connect() as conn:
        per_stage = [stage_status(conn, stage, now, totals=totals) for stage in stages.values()]
        by_stage = [(stage.name, c) for stage in stages.values() for c in stage.status_counts(conn, now)]
        counts = tuple(c for _name, c in by_stage) + (
            (
                CHANNEL_FACTS,
                N_(
                    "done at the payment channel, not recorded here yet (SELECT * FROM channel_fact WHERE resolved_at IS NULL)"
                ),
                open_facts(conn),
            ),
        )
        daemons = running_daemons(conn, now, takeover_seconds)
        run = reconcile_run.c
        latest = select(func.max(run.bill_date)).scalar_subquery()  # the primary key's last entry: one row read
        last = conn.execute(
            select(run.bill_date, run.state, run.diffs, run.last_error).where(run.bill_date == latest)
        ).first()
    notes = tuple((s.name, s.failed_note) for s in stages.values() if s.failed_note)
    return Status(
        now=now,
        stages=tuple(_with_daemons(s, daemons) for s in per_stage),
        counts=counts,
        counted_by=tuple((c[0], name) for name, c in by_stage),
        failed_notes=notes,
        daemons=tuple(name for name, _owner, _report in daemons),
        owners=tuple(owner for _name, owner, _report in daemons),
        totals=totals,
        reconcile={
            "bill_date": str(last.bill_date),
            "state": last.state,
            "diffs": last.diffs,
            "last_error": last.last_error,
        }
        if last
        else None,
    )


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


def stage_state(s: StageStatus, locale: str = "en") -> str:
    t = tr(locale)
    if s.up is None:
        return t(N_("not running"))
    if not s.down:
        return t(N_("up")) if s.daemons == 1 else t(N_("up ({daemons} daemons)")).format(daemons=s.daemons)
    worst = max(s.down, key=lambda d: d.seconds)
    reason = worst.reason or t(N_("failing"))
    if s.daemons == 1:
        return t(N_("DOWN for {age}: {reason}")).format(age=format_age(worst.seconds), reason=reason)
    return t(N_("DOWN on {down} of {daemons} daemons for {age}: {reason}")).format(
        down=len(s.down), daemons=s.daemons, age=format_age(worst.seconds), reason=reason
    )


def format_status(status: Status, locale: str = "en") -> str:
    """What `status` prints, in ``locale`` (codes, stage names and SQL stay as they are)."""
    t = tr(locale)
    done_label = t(N_("done")) if status.totals else t(N_("done")) + "*"
    head = [pad(t(N_("stage")), 16)] + [pad(t(w), 8, right=True) for w in (N_("pending"), N_("waiting"), N_("failed"))]
    oldest, state = pad(t(N_("oldest")), 7, right=True), t(N_("state"))
    lines = [" ".join([*head, pad(done_label, 10, right=True)]) + f"  {oldest}  {state}"]
    for s in status.stages:
        done = s.done if status.totals else s.done_by_daemons
        lines.append(
            f"{s.stage:16} {s.pending:8d} {s.waiting:8d} {s.failed:8d} {done:10d}  {format_age(s.oldest_pending_seconds):>7}"
            f"  {stage_state(s, locale)}"
        )
    if not status.daemons:
        lines.append(t(N_("no cancel-scanner daemon is running (none has beaten in the last takeover_seconds)")))
    if not status.totals:
        lines.append(
            t(
                N_(
                    "* done: rows the running daemons finished since they started"
                    " (`status --totals` counts the tables: slow on large ones)"
                )
            )
        )
    for _key, label, n in status.counts:
        if n:
            lines.append(f"{render(label, locale)}: {n}")
    if status.reconcile:
        rec = status.reconcile
        line = t(N_("reconciliation of {day}: {state}")).format(day=rec["bill_date"], state=rec["state"])
        if rec["state"] == "DIFFERS":
            line += t(N_(", {diffs} difference(s) (SELECT * FROM reconcile_diff WHERE bill_date = '{day}')")).format(
                diffs=rec["diffs"], day=rec["bill_date"]
            )
        elif rec["state"] in ("WAITING", "FAILED") and rec["last_error"]:
            line += f" ({rec['last_error']})"
        lines.append(line)
    noted = dict(status.failed_notes)
    for s in status.stages:
        if s.failed and s.stage in noted:
            lines.append(f"{s.stage} failed = {s.failed} {t(noted[s.stage])}")
    failed = sum(s.failed for s in status.stages if s.stage not in noted)
    if failed:
        lines.append(
            t(
                N_(
                    "{failed} row(s) failed for good and need a person: their reason is in last_error"
                    " (on MySQL, SELECT * FROM v_cancel_scanner_failed)"
                )
            ).format(failed=failed)
        )
    return "\n".join(lines)
