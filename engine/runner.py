"""The one place that claims rows, opens transactions, applies outcomes and retries.

Database stages: claim (FOR UPDATE SKIP LOCKED on MySQL; SQLite has one writer
and BEGIN IMMEDIATE), run the stage, flip the flags, commit: one transaction.

Gateway stages: three steps, and no transaction is open during an HTTP call.
1. claim and lease the rows (lease_owner, lease_until), commit;
2. call the gateway with bounded concurrency, each call only if it can finish
   before the lease runs out, so two daemons never call for the same refund at
   once;
3. re-read the rows still leased to us, write what the gateway said and flip the
   flags, release the lease, commit. A crash before 3 leaves the row leased; when
   the lease expires, any daemon retries it with the same out_refund_no, which
   the gateway answers with the original refund.

Every flag flip is guarded by the value it expects (``scanned = 0``, and our
lease for gateway stages); if fewer rows match than we claimed the whole
transaction rolls back, so a stray second runner changes nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

from loguru import logger
from sqlalchemy import Connection, Engine, Row, select, update

from engine.config import LEASE_SAFETY_MARGIN_SECONDS, Config, JobConfig
from engine.db import is_mysql
from engine.errors import is_transient_db_error
from engine.outcome import Done, Failed, Later, Outcome, Retry, clip
from engine.retry import GiveUp, decide
from engine.sql import update_rows
from engine.stage import Flags, Stage

MAX_IDLE_ROUNDS = 10_000


def utcnow() -> datetime:
    """Naive UTC with millisecond precision, as DATETIME(3) stores it."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LostClaim(Exception):
    """Fewer rows matched a guarded flag flip than were claimed: someone else got there first."""


@dataclass
class BatchReport:
    stage: str
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    later: int = 0
    skipped: int = 0
    batch_size: int = 0
    error: str | None = None
    outcomes: dict[int, Outcome] = field(default_factory=dict, repr=False)

    @property
    def full(self) -> bool:
        """The batch was full and all of it was worked: more rows are probably ready, run again at once."""
        return self.error is None and self.batch_size > 0 and self.claimed >= self.batch_size and not self.skipped

    @property
    def progressed(self) -> bool:
        return bool(self.done or self.failed or self.retried or self.later)

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class Hooks:
    """Test seams. Each is called inside the engine at the named moment; raising aborts the step."""

    after_gateway_call: Callable[[str, Row, Any], None] | None = None
    before_commit: Callable[[str, list[int]], None] | None = None


class _CallCrashed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_SKIPPED = object()


class Runner:
    def __init__(
        self,
        db: Engine,
        config: Config,
        stages: Mapping[str, Stage],
        gateway: Any = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
        hooks: Hooks | None = None,
    ):
        self.db = db
        self.config = config
        self.stages = dict(stages)
        self.gateway = gateway
        self.clock = clock
        self.owner = owner or new_owner_id()
        self.hooks = hooks or Hooks()
        self.stopping = threading.Event()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._mysql = is_mysql(db)

    # --- public ---------------------------------------------------------------------------------

    def run_stage(self, name: str, now: datetime | None = None) -> BatchReport:
        """Run one batch of one stage. ``now`` fixes the clock for the whole batch (tests)."""
        stage = self.stages[name]
        job = self.config.job(name)
        report = BatchReport(stage=name, batch_size=job.batch_size)
        if self.stopping.is_set():
            return report
        log = logger.bind(stage=name)
        try:
            if stage.flags.lease_owner is not None:
                self._run_gateway_stage(stage, job, now, report)
            else:
                self._run_db_stage(stage, job, now, report)
        except Exception as exc:
            if not is_transient_db_error(exc) and not isinstance(exc, LostClaim):
                raise
            report.error = f"{type(exc).__name__}: {_first_line(exc)}"
            # DEBUG: the caller (the daemon's backoff) reports the failure once per step.
            log.bind(action="batch_aborted").debug("batch rolled back, will retry: {}", report.error)
        if report.claimed:
            log.bind(
                action="batch",
                claimed=report.claimed,
                done=report.done,
                failed=report.failed,
                retried=report.retried,
                later=report.later,
                skipped=report.skipped,
            ).info("batch finished")
        return report

    def run_until_idle(
        self, now: datetime | None = None, stages: Iterable[str] | None = None, max_rounds: int = MAX_IDLE_ROUNDS
    ) -> dict[str, BatchReport]:
        """Run the stages in flow order until none has a ready row (at ``now``, if given)."""
        names = [n for n in (stages or self.stages) if self.config.job(n).enabled]
        totals = {n: BatchReport(stage=n) for n in names}
        for _ in range(max_rounds):
            progressed = False
            for name in names:
                while not self.stopping.is_set():
                    report = self.run_stage(name, now)
                    _accumulate(totals[name], report)
                    if report.error:
                        raise RuntimeError(f"stage {name} failed: {report.error}")
                    if report.progressed:
                        progressed = True
                    if not report.full:
                        break
            if not progressed or self.stopping.is_set():
                return totals
        raise RuntimeError(f"stages still busy after {max_rounds} rounds")

    def stop(self) -> None:
        """Stop claiming; calls not yet started are skipped and their leases released."""
        self.stopping.set()

    def release_leases(self) -> int:
        """Give back every lease this runner holds (clean shutdown)."""
        released = 0
        tables = {s.flags.table for s in self.stages.values() if s.flags.lease_owner is not None}
        for table in tables:
            with self.db.begin() as conn:
                res = conn.execute(
                    update(table).where(table.c.lease_owner == self.owner).values(lease_owner=None, lease_until=None)
                )
                released += res.rowcount or 0
        return released

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()

    # --- database stages ------------------------------------------------------------------------

    def _claim(self, conn: Connection, stage: Stage, now: datetime, limit: int, only_id: int | None = None) -> list[Row]:
        query = stage.ready(now, limit)
        if only_id is not None:
            query = query.where(stage.flags.id == only_id)
        if self._mysql:
            query = query.with_for_update(skip_locked=True)
        return list(conn.execute(query).all())

    def _run_db_stage(self, stage, job: JobConfig, now: datetime | None, report: BatchReport) -> None:
        now = now or self.clock()
        ids: list[int] = []
        try:
            with self.db.begin() as conn:
                rows = self._claim(conn, stage, now, job.batch_size)
                if not rows:
                    return
                ids = [r.id for r in rows]
                outcomes = dict(stage.process(conn, rows, now))
                self._apply_outcomes(conn, stage, job, rows, outcomes, now, report)
                if self.hooks.before_commit:
                    self.hooks.before_commit(stage.name, ids)
        except Exception as exc:
            if is_transient_db_error(exc) or not ids:
                raise
            # Not the database's fault: some row trips the stage. Find it one row at a time
            # so the rest of the batch is not held hostage.
            logger.bind(stage=stage.name, action="isolate", rows=len(ids)).warning(
                "batch failed ({}), retrying its rows one by one", _first_line(exc)
            )
            self._reset_report(report)
            self._run_rows_one_by_one(stage, job, ids, now, report)

    def _run_rows_one_by_one(self, stage, job: JobConfig, ids: list[int], now: datetime, report: BatchReport) -> None:
        for rid in ids:
            try:
                with self.db.begin() as conn:
                    rows = self._claim(conn, stage, now, 1, only_id=rid)
                    if not rows:
                        continue
                    outcomes = dict(stage.process(conn, rows, now))
                    self._apply_outcomes(conn, stage, job, rows, outcomes, now, report)
                    if self.hooks.before_commit:
                        self.hooks.before_commit(stage.name, [rid])
            except Exception as exc:
                if is_transient_db_error(exc):
                    raise
                logger.opt(exception=exc).bind(stage=stage.name, row_id=rid, action="row_crashed").warning(
                    "row raised {}", type(exc).__name__
                )
                with self.db.begin() as conn:
                    rows = self._claim(conn, stage, now, 1, only_id=rid)
                    if rows:
                        error = Retry("INTERNAL_ERROR", f"{type(exc).__name__}: {_first_line(exc)}")
                        self._apply_outcomes(conn, stage, job, rows, {rid: error}, now, report)

    @staticmethod
    def _reset_report(report: BatchReport) -> None:
        report.claimed = report.done = report.failed = report.retried = report.later = report.skipped = 0
        report.outcomes.clear()

    # --- gateway stages -------------------------------------------------------------------------

    def _run_gateway_stage(self, stage, job: JobConfig, fixed_now: datetime | None, report: BatchReport) -> None:
        flags = stage.flags
        now = fixed_now or self.clock()
        lease_until = now + timedelta(seconds=job.lease_seconds)
        with self.db.begin() as conn:
            rows = self._claim(conn, stage, now, job.batch_size)
            if not rows:
                return
            ids = [r.id for r in rows]
            conn.execute(
                update(flags.table)
                .where(flags.id.in_(ids))
                .values({flags.lease_owner: self.owner, flags.lease_until: lease_until})
            )
        log = logger.bind(stage=stage.name)
        log.bind(action="leased", rows=len(ids)).debug("rows leased until {}", lease_until)

        connect, read = self.config.wechat.timeout_seconds
        call_deadline = time.monotonic() + job.lease_seconds - (connect + read) - LEASE_SAFETY_MARGIN_SECONDS

        def call_one(row: Row):
            if self.stopping.is_set() or time.monotonic() > call_deadline:
                return row, _SKIPPED
            try:
                result = stage.call(self.gateway, row)
            except Exception as exc:  # a bug in the client: the outcome is unknown, never success
                log.opt(exception=exc).bind(row_id=row.id, action="call_crashed").warning("gateway call raised")
                result = _CallCrashed(exc)
            if self.hooks.after_gateway_call:
                self.hooks.after_gateway_call(stage.name, row, result)
            return row, result

        results = list(self._pool(stage.name, job.concurrency).map(call_one, rows))
        now = fixed_now or self.clock()
        with self.db.begin() as conn:
            # Only rows still leased to us: if our lease expired and another daemon took the
            # row over, its answer wins and ours is dropped (the gateway call was idempotent).
            owned = {
                r.id: r
                for r in conn.execute(_owned_query(stage, ids, self.owner, self._mysql)).all()
            }
            called: list[tuple[Row, Any]] = []
            skipped: list[int] = []
            crashed: dict[int, Outcome] = {}
            for row, result in results:
                if row.id not in owned:
                    log.bind(row_id=row.id, action="lease_lost").warning("lease lost before the answer was written")
                    continue
                if result is _SKIPPED:
                    skipped.append(row.id)
                elif isinstance(result, _CallCrashed):
                    crashed[row.id] = Retry("CLIENT_ERROR", f"{type(result.exc).__name__}: {_first_line(result.exc)}")
                else:
                    called.append((owned[row.id], result))
            outcomes = dict(stage.apply(conn, called, now)) if called else {}
            outcomes.update(crashed)
            fresh_rows = [owned[i] for i in outcomes]
            self._apply_outcomes(conn, stage, job, fresh_rows, outcomes, now, report, owner=self.owner)
            if skipped and not self.stopping.is_set():
                log.bind(action="calls_skipped", rows=len(skipped)).warning(
                    "{} call(s) not started: the lease would have run out before they could finish", len(skipped)
                )
            if skipped:
                conn.execute(
                    update(flags.table)
                    .where(flags.id.in_(skipped), flags.lease_owner == self.owner)
                    .values({flags.lease_owner: None, flags.lease_until: None})
                )
                report.skipped += len(skipped)
                report.claimed += len(skipped)
            if self.hooks.before_commit:
                self.hooks.before_commit(stage.name, list(outcomes))

    def _pool(self, name: str, size: int) -> ThreadPoolExecutor:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"cs-{name}")
        return pool

    # --- outcomes -> flag flips -----------------------------------------------------------------

    def _apply_outcomes(
        self,
        conn: Connection,
        stage: Stage,
        job: JobConfig,
        rows: Sequence[Row],
        outcomes: Mapping[int, Outcome],
        now: datetime,
        report: BatchReport,
        owner: str | None = None,
    ) -> None:
        flags = stage.flags
        missing = {r.id for r in rows} - set(outcomes)
        if missing:
            raise RuntimeError(f"stage {stage.name} returned no outcome for rows {sorted(missing)[:10]}")
        attempts_col = flags.attempts.name
        release = {flags.lease_owner.name: None, flags.lease_until.name: None} if owner else {}
        groups: dict[frozenset, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        log = logger.bind(stage=stage.name)
        for row in rows:
            outcome = outcomes[row.id]
            report.claimed += 1
            values: dict[str, Any]
            if isinstance(outcome, Retry):
                decision = decide(outcome, getattr(row, attempts_col), now, job)
                if isinstance(decision, GiveUp):
                    outcome = Failed(outcome.code, decision.reason)
                else:
                    values = {
                        attempts_col: decision.attempts,
                        flags.next_attempt_at.name: decision.at,
                        flags.last_error.name: outcome.describe(),
                    }
                    report.retried += 1
                    log.bind(row_id=row.id, action="retry", attempt=decision.attempts, at=decision.at).warning(
                        "will retry: {}", outcome.describe()
                    )
            if isinstance(outcome, Done):
                values = {
                    flags.scanned.name: 1,
                    flags.success.name: 1,
                    attempts_col: 0,
                    flags.next_attempt_at.name: None,
                    flags.last_error.name: None,
                    **stage.done_values(outcome, now),
                }
                report.done += 1
            elif isinstance(outcome, Failed):
                values = {
                    flags.scanned.name: 1,
                    flags.success.name: 0,
                    flags.next_attempt_at.name: None,
                    flags.last_error.name: outcome.describe(),
                    **stage.failed_values(outcome, now),
                }
                report.failed += 1
                # A rejected merchant request is business as usual; anything else needs a person.
                level = "INFO" if getattr(stage, "rejections_are_routine", False) else "ERROR"
                log.bind(row_id=row.id, action="failed", code=outcome.code).log(level, "{}", outcome.describe())
            elif isinstance(outcome, Later):
                values = {
                    attempts_col: 0,
                    flags.next_attempt_at.name: outcome.at,
                    flags.last_error.name: clip(outcome.note) if outcome.note else None,
                }
                report.later += 1
            report.outcomes[row.id] = outcome
            values.update(release)
            groups[frozenset(values)].append((row.id, values))

        # One UPDATE per kind of outcome, however many rows and whatever their values:
        # a column whose value differs between rows is written with CASE id WHEN ... END.
        guard = [flags.scanned == 0] + ([flags.lease_owner == owner] if owner else [])
        for members in groups.values():
            matched = update_rows(conn, flags.table, dict(members), *guard)
            if matched != len(members):
                raise LostClaim(f"{stage.name}: {len(members)} rows claimed, {matched} still ours")


def _owned_query(stage: Stage, ids: list[int], owner: str, mysql: bool):
    flags = stage.flags
    query = select(flags.table).where(flags.id.in_(ids), flags.lease_owner == owner, flags.scanned == 0)
    return query.with_for_update() if mysql else query


def _accumulate(total: BatchReport, report: BatchReport) -> None:
    for attr in ("claimed", "done", "failed", "retried", "later", "skipped"):
        setattr(total, attr, getattr(total, attr) + getattr(report, attr))
    total.outcomes.update(report.outcomes)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return clip(text.splitlines()[0] if text else type(exc).__name__, 200)
