"""The one place that claims rows, opens transactions, applies outcomes and retries.

Database stages: claim (FOR UPDATE SKIP LOCKED on MySQL; SQLite has one writer
and BEGIN IMMEDIATE), run the stage, flip the flags, commit: one transaction.

Gateway stages: named steps, and no transaction is open during an HTTP call.
1. ``_lease``: claim as many rows as the pacer can send within the lease, lease
   them (lease_owner, lease_until, both on the database's clock), commit;
2. ``_call_all``: call the gateway with bounded concurrency. Every call carries a
   deadline (the lease, and the registry's heartbeat window, whichever ends
   first): the gateway sends it only if it can still finish by then, re-checks
   right before the bytes leave, and cuts it off at the deadline. So a process
   paused past its lease sends nothing when it resumes, and no two processes
   ever have a call in flight for the same refund;
3. ``_write_answers``: re-read the rows still leased to us (the fencing check:
   a row taken over by another process drops our answer), write what the gateway
   said, flip the flags, release the leases, commit. A crash before 3 leaves the
   row leased until the registry releases it; any process then retries it with
   the same out_refund_no, which the gateway answers with the original refund.

Every flag flip is guarded by the value it expects (``scanned = 0``, and our
lease for gateway stages); if fewer rows match than we claimed the whole
transaction rolls back, so a stray second runner changes nothing.

Time: every time the engine compares (due times, leases, heartbeats) comes from
one clock, the database's (``engine.clock.DbClock``), read once per batch.
Tests inject their own clock in its place.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

from loguru import logger
from sqlalchemy import Column, Connection, Engine, Row, select, update

from cancel_scanner.engine.clock import MIN_CALL_SECONDS, DbClock, local_utcnow
from cancel_scanner.engine.config import LEASE_SAFETY_MARGIN_SECONDS, Config, JobConfig
from cancel_scanner.engine.db import is_mysql
from cancel_scanner.engine.errors import (
    describe_db_error, shop_refusal, is_environment_db_error, is_lost_race, is_transient_db_error,
)
from cancel_scanner.engine.facts import record_fact, resolve_facts
from cancel_scanner.engine.logs import held_until_commit, release
from cancel_scanner.engine.isolate import fault_outcome, isolate, try_in_savepoint, undo
from cancel_scanner.engine.outcome import OUTCOME_UNKNOWN, Blocked, Contended, Done, Failed, Later, Outcome, Retry, clip
from cancel_scanner.engine.flips import count_outcome, flip_for, log_outcome
from cancel_scanner.engine.registry import Registry, encode_limits
from cancel_scanner.engine.sql import update_rows
from cancel_scanner.engine.stage import Stage

MAX_IDLE_ROUNDS = 10_000
MAX_CONTENTION_ROUNDS = 4  # a batch re-done without newly contended rows at most this often
utcnow = local_utcnow  # this host's clock: for display only, never for a comparison the engine makes


# A gateway batch leases no more rows than the pacer can start calls for within this long: the rest
# stay in the shared pool, so N daemons splitting one merchant's pace end a backlog together instead
# of one of them calling out a long lease alone. At 150/s it is still a full batch of 200.
CLAIM_AHEAD_SECONDS = 2.0
PACED_WAIT_SECONDS = 0.05  # run_until_idle, when the pacer is booked past the window: look again this soon
MAX_PACED_SECONDS = 60.0  # ... but not for longer than this in a row: then something is wrong, say so
MAX_LOST_IN_A_ROW = 20  # races lost one after another before the caller treats it as a failure


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
    blocked_rows: int = 0
    batch_size: int = 0
    error: str | None = None  # the batch rolled back (a transient database error): back off, retry
    lost: str | None = None  # the batch lost a race (1213, a guarded flip found fewer rows): nothing happened, look again
    one_by_one: bool = False  # some rows failed alone (isolate): the rest of the batch was done without them
    paced: bool = False  # claimed nothing because the pacer is booked past the lease window: rows may wait, look again soon
    blocked: str | None = None  # the environment stops the stage (privileges, credentials): back off, alert
    outcomes: dict[int, Outcome] = field(default_factory=dict, repr=False)

    @property
    def full(self) -> bool:
        """The batch was full and all of it was worked: more rows are probably ready, run again at once."""
        return (
            self.error is None
            and self.blocked is None
            and self.batch_size > 0
            and self.claimed >= self.batch_size
            and not self.skipped
        )

    @property
    def progressed(self) -> bool:
        return bool(self.done or self.failed or self.retried or self.later)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def counts(self) -> dict[str, int]:
        """What happened to the rows claimed, for the batch's log line."""
        return {k: getattr(self, k) for k in ("claimed", "done", "failed", "retried", "later", "skipped")}


@dataclass
class Hooks:
    """Test seams. Each is called inside the engine at the named moment; raising aborts the step."""

    after_lease: Callable[[str, list[int]], None] | None = None
    after_gateway_call: Callable[[str, Row, Any], None] | None = None
    before_commit: Callable[[str, list[int]], None] | None = None


class _CallCrashed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _NotStarted:
    """The runner stopped before this row's call began."""


_NOT_STARTED = _NotStarted()


class Runner:
    def __init__(
        self,
        db: Engine,
        config: Config,
        stages: Mapping[str, Stage],
        gateway: Any = None,
        *,
        clock: Callable[[], datetime] | None = None,
        owner: str | None = None,
        hooks: Hooks | None = None,
        registry: Registry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.db = db
        self.config = config
        self.stages = dict(stages)
        self.gateway = gateway
        self.clock = clock or DbClock(db)
        self.hooks = hooks or Hooks()
        self.monotonic = monotonic
        # An observer of every batch (report, seconds): the monitoring's counters. Set by the composition root.
        self.on_batch: Callable[[BatchReport, float], None] | None = None
        self.registry = registry or Registry(
            db,
            self.clock,
            self.lease_columns(),
            takeover_seconds=config.takeover_seconds,
            heartbeat_seconds=config.heartbeat_seconds,
            monotonic=monotonic,
            owner=owner,
            pace_group=self._pace_group(),
            pace_limits=self._pace_limits(),
        )
        if self.registry.pace_group is not None:
            self.registry.on_share = self._share_pace
        self._sharers: int | None = None  # None until the first reap has counted who shares our pace
        self._limits: dict[str, float] | None = None  # the strictest limits of our group, as last paced at
        # Set while the processes of our merchant were configured with different limits: says who (the
        # config_error alert reads it); None when they agree.
        self.pace_disagreement: str | None = None
        self.stopping = threading.Event()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._mysql = is_mysql(db)
        # Rows whose own flags the database refuses to change, by stage: left out of claims until then.
        self._quarantined: dict[str, dict[int, float]] = {}

    def _pace_group(self) -> str | None:
        """The merchant whose WeChat QPS this process shares with the other processes of it, or None:
        sharing is off, or nothing here calls a paced endpoint."""
        calls = any(stage.kind == "gateway" and self.config.job(name).enabled for name, stage in self.stages.items())
        if not hasattr(self.gateway, "share_pace") or not calls or not self.config.wechat.qps_shared:
            return None
        return getattr(self.gateway, "pace_group", None) or self.config.wechat.mchid

    def _pace_limits(self) -> dict[str, float]:
        """The merchant's limits this process was configured with (published in its registry entry)."""
        limits = getattr(self.gateway, "pace_limits", None)
        return dict(limits()) if callable(limits) else {}

    def _share_pace(self, sharers: int, fresh: bool, peers: Sequence[tuple[str, Mapping[str, float]]] = ()) -> None:
        """After every reap: pace at our share of the merchant's QPS. A newcomer among others holds its
        calls for two heartbeats, by which time every other process has read its entry and slowed down.

        The processes of one merchant may have been configured with different limits: each paces at
        the strictest any of them published, and says so (WARNING, the config_error alert)."""
        ours = self.registry.pace_limits
        limits = dict(ours)
        for _who, published in peers:
            for endpoint, qps in published.items():
                if endpoint in limits:
                    limits[endpoint] = min(limits[endpoint], qps)
        self._note_disagreement(ours, peers, strictest_changed=limits != self._limits)
        hold = 2 * self.config.heartbeat_seconds if fresh and sharers > 1 else 0.0
        if sharers == self._sharers and limits == self._limits and not fresh:
            return
        paces = self.gateway.share_pace(sharers, hold_seconds=hold, limits=limits)
        if sharers != self._sharers or limits != self._limits:
            logger.bind(stage="pace", action="pace_shared", sharers=sharers).info(
                "WeChat's per-merchant limits shared by {} process(es): {}", sharers,
                ", ".join(f"{endpoint} {qps:.3g}/s" for endpoint, qps in paces.items()),
            )
        self._sharers, self._limits = sharers, limits

    def _note_disagreement(self, ours: Mapping[str, float], peers: Sequence[tuple[str, Mapping[str, float]]], *,
                           strictest_changed: bool) -> None:
        """One WARNING when this merchant's processes start to disagree on its limits (and again only if
        the strictest changes); the text names every process that differs, for the config_error alert."""
        mine = encode_limits(ours)  # compared as published (qps:g), or rounding alone would look like a difference
        differ = {who: published for who, published in peers if published and encode_limits(published) != mine}
        said = None
        if differ:
            said = "; ".join(f"{who} {_limits_text(published)}" for who, published in sorted(differ.items()))
            said = (f"processes of merchant {self.registry.pace_group} were configured with other limits than this"
                    f" one's ({_limits_text(ours)}): {said}; all pace at the strictest")
            if self.pace_disagreement is None or strictest_changed:
                logger.bind(stage="pace", action="pace_limits_differ", hosts=sorted(differ)).warning("{}", said)
        elif self.pace_disagreement is not None:
            logger.bind(stage="pace", action="pace_limits_agree").info("the merchant's processes agree on its limits again")
        self.pace_disagreement = said

    @property
    def owner(self) -> str:
        """The lease owner this process writes now (a new one after it was declared dead)."""
        return self.registry.owner

    def lease_columns(self) -> list[tuple[Column, Column]]:
        """(lease_owner, lease_until) of every gateway stage: what a dead process may still hold."""
        pairs = {(s.flags.lease_owner, s.flags.lease_until) for s in self.stages.values() if s.kind == "gateway"}
        return sorted(pairs, key=lambda pair: (pair[0].table.name, pair[0].name))

    # --- public ---------------------------------------------------------------------------------

    def run_stage(self, name: str, now: datetime | None = None) -> BatchReport:
        """Run one batch of one stage. ``now`` fixes the clock for the whole batch (tests)."""
        stage = self.stages[name]
        job = self.config.job(name)
        report = BatchReport(stage=name, batch_size=job.batch_size)
        if self.stopping.is_set():
            return report
        started = time.perf_counter()
        log = logger.bind(stage=name)
        try:
            if stage.kind == "gateway":
                self._run_gateway_stage(stage, job, now, report)
            else:
                self._run_db_stage(stage, job, now, report)
        except Exception as exc:
            if is_environment_db_error(exc):
                report.blocked = describe_db_error(exc)
            elif isinstance(exc, LostClaim) or is_lost_race(exc):
                # Another daemon won these rows (on Galera: certification at COMMIT): our batch rolled
                # back whole, so nothing happened; the caller looks again at once.
                report.lost = f"LostClaim: {exc}" if isinstance(exc, LostClaim) else describe_db_error(exc)
            elif is_transient_db_error(exc):
                report.error = describe_db_error(exc)
            else:
                raise
            _reset(report)  # its write-back (one transaction) rolled back whole: none of its rows is done
            # DEBUG: the caller (the daemon's backoff) reports the failure once per step.
            log.bind(action="batch_aborted").debug("batch rolled back, will retry: {}", report.error or report.blocked or report.lost)
        if report.claimed:
            log.bind(action="batch", **report.counts()).info("batch finished")
        if self.on_batch is not None:
            self.on_batch(report, time.perf_counter() - started)
        return report

    def run_until_idle(
        self, now: datetime | None = None, stages: Iterable[str] | None = None, max_rounds: int = MAX_IDLE_ROUNDS
    ) -> dict[str, BatchReport]:
        """Run the stages in flow order until none has a ready row (at ``now``, if given)."""
        names = [n for n in (stages or self.stages) if self.config.job(n).enabled]
        totals = {n: BatchReport(stage=n) for n in names}
        lost = paced = 0
        for _ in range(max_rounds):
            progressed = False
            for name in names:
                while not self.stopping.is_set():
                    report = self.run_stage(name, now)
                    _accumulate(totals[name], report)
                    if report.error or report.blocked:
                        raise RuntimeError(f"stage {name} stopped: {report.error or report.blocked}")
                    if report.lost:
                        lost += 1
                        if lost > MAX_LOST_IN_A_ROW:
                            raise RuntimeError(f"stage {name} lost {lost} races in a row: {report.lost}")
                        continue  # nothing happened: look again
                    lost = 0
                    if report.paced:
                        paced += 1
                        if paced * PACED_WAIT_SECONDS > MAX_PACED_SECONDS:
                            raise RuntimeError(f"stage {name} found no free call slot for {MAX_PACED_SECONDS:.0f}s")
                        self.stopping.wait(PACED_WAIT_SECONDS)  # the pacer frees a slot within the window
                        continue
                    paced = 0
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
        """Give back every lease this runner holds (clean shutdown), and leave the registry."""
        released = 0
        for owner_col, until_col in self.lease_columns():
            with self.db.begin() as conn:
                res = conn.execute(
                    update(owner_col.table).where(owner_col == self.owner).values({owner_col: None, until_col: None})
                )
                released += res.rowcount or 0
        self.registry.deregister()
        return released

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()

    # --- database stages ------------------------------------------------------------------------

    def _claim(self, conn: Connection, stage: Stage, now: datetime, limit: int) -> list[Row]:
        """Ready rows, locked (SKIP LOCKED). Beside other processes, the rows of our own slice first,
        then any: claimers pick different rows instead of racing for the same first ones, which on
        Galera, where SKIP LOCKED does not see another node's locks, would only be settled at COMMIT
        (a lost claim).

        A slice is every N-th block of batch_size consecutive ids (N live processes, ours the k-th).
        Ours are found by a plain read (no lock) and then locked by id: a locking read filtered by
        the slice would lock, for a moment, every row it scans on its way, the other slices' too,
        and on Galera another node's write applied to such a row aborts our whole transaction."""
        held = self._quarantined_ids(stage.name)
        if held:
            return [r for r in self._claim_ready(conn, stage, now, limit + len(held)) if r.id not in held][:limit]
        return self._claim_ready(conn, stage, now, limit)

    def _claim_ready(self, conn: Connection, stage: Stage, now: datetime, limit: int) -> list[Row]:
        rank, of = self.registry.slice
        if of <= 1:
            return self._locked(conn, stage.ready(now, limit))
        # A database batch takes a block of batch_size ids; a gateway batch, a few seconds of its pace,
        # takes every N-th id (it inserts nothing whose index neighbours another daemon's rows).
        block = 1 if stage.kind == "gateway" else self.config.job(stage.name).batch_size
        ids = stage.flags.id
        seen = [r.id for r in conn.execute(stage.ready(now, limit * of)).all()]
        mine = [i for i in seen if (i // block) % of == rank][:limit]
        rows = []
        if mine:
            # By primary key: the ready query's own index would scan (and lock) from the first pending row.
            by_key = stage.ready(now, limit).where(ids.in_(mine))
            for dialect in ("mysql", "mariadb"):
                by_key = by_key.with_hint(stage.flags.table, "FORCE INDEX (PRIMARY)", dialect)
            rows = self._locked(conn, by_key)
        if len(rows) < limit:
            rest = stage.ready(now, limit - len(rows))
            if rows:
                rest = rest.where(ids.not_in([r.id for r in rows]))
            rows += self._locked(conn, rest)
        return rows

    def _locked(self, conn: Connection, query) -> list[Row]:
        if self._mysql:
            query = query.with_for_update(skip_locked=True)
        return list(conn.execute(query).all())

    def _run_db_stage(self, stage, job: JobConfig, now: datetime | None, report: BatchReport) -> None:
        now = now or self.clock()
        with self.db.begin() as conn:
            rows = self._claim(conn, stage, now, job.batch_size)
            if not rows:
                return
            # _process undoes its own writes when it raises (the savepoint its contended rows need).
            done = isolate(conn, rows, lambda part: self._processed(conn, stage, job, part, now), _is_row_fault, atomic=True)
            for part in done.results:
                _accumulate(report, part)
            if done.faults:
                report.one_by_one = True  # some of its rows failed alone: the rest stays done
                self._write_faults(conn, stage, job, [(row, exc, None) for row, exc in done.faults], now, report)
            if self.hooks.before_commit:
                self.hooks.before_commit(stage.name, [r.id for r in rows])

    def _processed(self, conn: Connection, stage, job: JobConfig, rows: list[Row], now: datetime) -> BatchReport:
        part = BatchReport(stage=stage.name)
        self._process(conn, stage, job, rows, now, part)
        return part

    def _write_faults(self, conn: Connection, stage, job: JobConfig, faults: list[tuple[Row, BaseException, Any]],
                      now: datetime, report: BatchReport, owner: str | None = None) -> None:
        """Rows that failed alone: each its attempt counted and its reason, in a savepoint of its own (a
        shop rule may refuse even that); for a gateway stage, first what the channel did for it."""
        for row, exc, result in faults:
            fact = stage.channel_fact(row, result) if result is not None else None
            # A stage whose 1/0 says "the channel refused" (submit_refund): after a call, whatever its
            # answer, a row that gives up says "unknown, check by hand", never "refused".
            guarded = getattr(stage, "fact_stays_pending", False)
            outcome = fault_outcome(stage.name, row.id, exc, fact=fact.detail if fact else None,
                                    bugs_stay_pending=getattr(stage, "bugs_stay_pending", False), fact_stays_pending=guarded,
                                    give_up_code=OUTCOME_UNKNOWN if guarded and result is not None else None)
            if fact is not None:
                kept = try_in_savepoint(conn, lambda: record_fact(conn, stage.name, row.id, fact, outcome.describe(), now))
                if kept is not None and not _is_row_fault(kept):
                    raise kept  # the database's failure (a grant missing on channel_fact, a lock wait): the batch's
                if kept is not None:
                    logger.opt(exception=kept).bind(stage=stage.name, row_id=row.id, action="fact_lost", fact=fact.fact).error(
                        "{}: could not be kept in channel_fact either", fact.detail)
            self._write_alone(conn, stage, job, [row], {row.id: outcome}, now, report, owner)

    def _write_alone(self, conn: Connection, stage, job: JobConfig, rows: Sequence[Row], outcomes: Mapping[int, Outcome],
                     now: datetime, report: BatchReport, owner: str | None) -> None:
        """Each row's flags in a savepoint of its own: a row whose own flags the database refuses (a
        shop rule on the whole row) is left out of claims for a while, and the others are written."""
        for row in rows:
            part = BatchReport(stage=stage.name)
            refused = try_in_savepoint(conn, lambda: self._write_outcomes(conn, stage, job, [row], {row.id: outcomes[row.id]}, now,
                                                                          part, owner=owner))
            if refused is None:
                _accumulate(report, part)
                continue
            if not _is_row_fault(refused):
                raise refused
            self._quarantine(stage.name, row.id, job)
            logger.bind(stage=stage.name, row_id=row.id, action="row_unwritable").error(
                "its flags cannot be written ({}): left alone for {:g}s", shop_refusal(refused) or type(refused).__name__,
                self._quarantine_seconds(job))

    def _quarantine_seconds(self, job: JobConfig) -> float:
        return float(job.retry_delays_seconds[-1])

    def _quarantine(self, stage: str, row_id: int, job: JobConfig) -> None:
        self._quarantined.setdefault(stage, {})[row_id] = self.monotonic() + self._quarantine_seconds(job)

    def _quarantined_ids(self, stage: str) -> list[int]:
        held = self._quarantined.get(stage)
        if not held:
            return []
        now = self.monotonic()
        for row_id in [i for i, until in held.items() if until <= now]:
            del held[row_id]
        return sorted(held)

    def _process(self, conn: Connection, stage, job: JobConfig, rows: Sequence[Row], now: datetime, report: BatchReport) -> None:
        """process, flip the flags, finish; rows that finish finds contended go round again as Later.

        ``finish`` takes the shop's rows (goods) last, so they are locked only from there to the
        commit. When some are held by someone else, a savepoint takes the batch back to before
        ``process``: those rows are answered Later and the rest is done again, without them.
        """
        # Two rounds in practice: InnoDB keeps the row locks a rolled-back savepoint took, so the
        # second round's goods are all ours already. More would mean a stage whose finish touches
        # rows its first round did not: roll back and retry the batch rather than loop.
        contended: dict[int, Outcome] = {}
        for _ in range(MAX_CONTENTION_ROUNDS):
            work = [r for r in rows if r.id not in contended]
            attempt = BatchReport(stage=stage.name)
            savepoint = conn.begin_nested()
            with held_until_commit() as events:  # a round undone logs nothing
                try:
                    outcomes = {**(dict(stage.process(conn, work, now)) if work else {}), **contended}
                    self._write_outcomes(conn, stage, job, rows, outcomes, now, attempt)
                    stage.finish(conn, work, outcomes, now)
                except Contended as busy:
                    savepoint.rollback()
                    later = Later(now + timedelta(seconds=busy.retry_in_seconds), busy.note)
                    contended.update({rid: later for rid in busy.row_ids})
                    continue
                except Exception as exc:
                    undo(savepoint, exc)  # the caller decides: a row's fault, or the batch's
                    raise
            savepoint.commit()
            release(events)
            _accumulate(report, attempt)
            return
        raise LostClaim(f"{stage.name}: shared rows still contended after {MAX_CONTENTION_ROUNDS} rounds")

    # --- gateway stages -------------------------------------------------------------------------

    def _run_gateway_stage(self, stage, job: JobConfig, fixed_now: datetime | None, report: BatchReport) -> None:
        registry = self.registry
        if not registry.threaded:
            registry.tick()  # no heartbeat thread (run --once, tests): beat and reap before every lease
        if registry.pace_group is not None and self._sharers is None:
            if registry.safe_until() - self.monotonic() < MIN_CALL_SECONDS:
                # No heartbeat has landed yet (the database is away): a failure to back off on, not a pace.
                report.error = registry.last_error or "no fresh heartbeat in the process registry"
            else:
                report.paced = True  # the heartbeat thread has not counted the merchant's processes yet: call nothing
            return
        held = self.gateway.held_for(stage.endpoint) if registry.pace_group is not None else 0.0
        if held > 0:
            # A newcomer waits out its hold (two heartbeats) here rather than look idle: run --once goes on after.
            if self.stopping.wait(held):
                return
            if not registry.threaded:
                registry.tick()  # the wait outlived the last beat's window
        owner = registry.owner
        leased_at = self.monotonic()
        safe_until = registry.safe_until(owner)
        if safe_until - leased_at < MIN_CALL_SECONDS:
            # No fresh heartbeat: whatever we leased could not be called, and survivors may be
            # about to take our rows. Back off until the heartbeat lands again.
            report.error = registry.last_error or "no fresh heartbeat in the process registry"
            return
        lease_deadline = leased_at + job.lease_seconds - LEASE_SAFETY_MARGIN_SECONDS
        limit = self._claim_limit(stage, job, min(lease_deadline, safe_until) - leased_at)
        if limit <= 0:
            report.paced = True
            return  # the pacer is booked for longer than a lease: claiming now would only idle rows
        report.batch_size = limit  # "full" means: got all it asked for, so look again at once
        rows = self._lease(stage, job, fixed_now or self.clock(), limit, owner)
        if not rows:
            return

        def deadline() -> float:
            # Read right before each call is sent: a process that was declared dead (or paused past
            # its heartbeat window) gets -inf or a past instant, and sends nothing. Handed to the
            # gateway on time.monotonic(), whatever clock this runner was given.
            return time.monotonic() + min(lease_deadline, registry.safe_until(owner)) - self.monotonic()

        try:
            if self.hooks.after_lease:
                self.hooks.after_lease(stage.name, [r.id for r in rows])
            results = self._call_all(stage, job, rows, deadline)
            self._write_answers(stage, job, [r.id for r in rows], results, fixed_now or self.clock(), owner, report)
        except Exception:
            # Every call of the batch is over (or never started): give the rows back now rather than
            # at lease expiry. Their answers are lost, and the replay with the same number is safe.
            self._release_after_failure(stage, rows, owner)
            raise

    def _release_after_failure(self, stage, rows: Sequence[Row], owner: str) -> None:
        flags = stage.flags
        try:
            with self.db.begin() as conn:
                update_rows(
                    conn, flags.table,
                    {r.id: {flags.lease_owner.name: None, flags.lease_until.name: None} for r in rows},
                    flags.lease_owner == owner,
                )
        except Exception as exc:  # the database is the reason: the reaper or lease expiry frees them
            logger.bind(stage=stage.name, action="release_failed").debug("leases not released: {}", type(exc).__name__)

    def _claim_limit(self, stage, job: JobConfig, window: float) -> int:
        """Lease no more rows than the pacer can start calls for within ``window`` seconds (the lease or
        the heartbeat window, less the time one call needs) and CLAIM_AHEAD_SECONDS, so N processes at
        any QPS progress and share a backlog to its end."""
        if self.gateway is None:
            return job.batch_size  # nothing to call: the claim finds no ready row or fails loudly later
        # A fifth of the window is slack for the lease's own transaction and thread wake-ups.
        usable = max(0.0, window * 0.8 - MIN_CALL_SECONDS)
        capacity = self.gateway.calls_within(stage.endpoint, usable)
        if capacity is None:
            return job.batch_size
        # At least one row whenever one call fits the window, so a slow pace still makes progress.
        ahead = self.gateway.calls_within(stage.endpoint, min(CLAIM_AHEAD_SECONDS, usable)) or 0
        return min(job.batch_size, capacity, max(ahead, 1 if capacity else 0))

    def _lease(self, stage, job: JobConfig, now: datetime, limit: int, owner: str) -> list[Row]:
        flags = stage.flags
        with self.db.begin() as conn:
            rows = self._claim(conn, stage, now, limit)
            if rows:
                conn.execute(
                    update(flags.table)
                    .where(flags.id.in_([r.id for r in rows]))
                    .values(
                        {
                            flags.lease_owner: owner,
                            flags.lease_until: now + timedelta(seconds=job.lease_seconds),
                            **stage.lease_values(),
                        }
                    )
                )
        if rows:
            logger.bind(stage=stage.name, action="leased", rows=len(rows)).debug("rows leased for {:g}s", job.lease_seconds)
        return rows

    def _call_all(self, stage, job: JobConfig, rows: Sequence[Row], deadline: Callable[[], float]) -> list[tuple[Row, Any]]:
        log = logger.bind(stage=stage.name)

        def call_one(row: Row) -> tuple[Row, Any]:
            if self.stopping.is_set():
                return row, _NOT_STARTED
            try:
                result = stage.call(self.gateway, row, deadline)
            except Exception as exc:  # a bug in the client: the outcome is unknown, never success
                log.opt(exception=exc).bind(row_id=row.id, action="call_crashed").warning("gateway call raised")
                result = _CallCrashed(exc)
            if self.hooks.after_gateway_call:
                self.hooks.after_gateway_call(stage.name, row, result)
            return row, result

        return list(self._pool(stage.name, job.concurrency).map(call_one, rows))

    def _write_answers(
        self, stage, job: JobConfig, ids: list[int], results: list[tuple[Row, Any]], now: datetime, owner: str,
        report: BatchReport,
    ) -> None:
        log = logger.bind(stage=stage.name)
        with self.db.begin() as conn:
            # The fencing check: only rows still leased to this owner. If our lease was released
            # (we were declared dead) or taken over, the other holder's answer wins and ours is dropped.
            owned = {r.id: r for r in conn.execute(_owned_query(stage, ids, owner, self._mysql)).all()}
            called: list[tuple[Row, Any]] = []
            unsent: list[Row] = []
            crashed: dict[int, Outcome] = {}
            for row, result in results:
                if row.id not in owned:
                    log.bind(row_id=row.id, action="lease_lost").warning("lease lost before the answer was written; answer dropped")
                    continue
                if isinstance(result, _CallCrashed):
                    # The client raised: the bytes may have left, so this is an unknown outcome.
                    crashed[row.id] = Retry(
                        "CLIENT_ERROR", f"{type(result.exc).__name__}: {_first_line(result.exc)}", give_up_code=OUTCOME_UNKNOWN
                    )
                elif result is _NOT_STARTED or stage.not_sent(result):
                    unsent.append(row)  # the row as leased: its values from before the lease
                else:
                    called.append((owned[row.id], result))
            outcomes: dict[int, Outcome] = {}

            def answer(part: list[tuple[Row, Any]]) -> BatchReport:
                said = dict(stage.apply(conn, part, now))
                written = BatchReport(stage=stage.name)
                self._write_outcomes(conn, stage, job, [row for row, _ in part], said, now, written, owner=owner)
                # What the channel did is recorded now for the rows this try finished (a fact kept by
                # an earlier try of theirs is closed); a row still pending keeps its fact open.
                finished = [i for i, o in written.outcomes.items() if isinstance(o, (Done, Failed))]
                if finished:
                    resolve_facts(conn, stage.name, finished, now)
                return written

            done = isolate(conn, called, answer, _is_row_fault)
            for part in done.results:
                _accumulate(report, part)
                outcomes.update(part.outcomes)
            if done.faults:
                report.one_by_one = True
                self._write_faults(conn, stage, job, [(row, exc, result) for (row, result), exc in done.faults], now, report, owner=owner)
                outcomes.update({row.id: report.outcomes[row.id] for (row, _), _ in done.faults if row.id in report.outcomes})
            if crashed:
                self._write_alone(conn, stage, job, [owned[i] for i in crashed], crashed, now, report, owner)
                outcomes.update(crashed)
            self._release_unsent(conn, stage, unsent, owner, report)
            if self.hooks.before_commit:
                self.hooks.before_commit(stage.name, list(outcomes))

    def _release_unsent(self, conn: Connection, stage, unsent: list[Row], owner: str, report: BatchReport) -> None:
        """Rows whose call never left: give them back as they were, no attempt spent."""
        if not unsent:
            return
        flags = stage.flags
        values = {
            row.id: {flags.lease_owner.name: None, flags.lease_until.name: None, **stage.unlease_values(row)}
            for row in unsent
        }
        update_rows(conn, flags.table, values, flags.lease_owner == owner)
        report.skipped += len(unsent)
        report.claimed += len(unsent)
        if not self.stopping.is_set():
            logger.bind(stage=stage.name, action="calls_not_sent", rows=len(unsent)).info(
                "{} call(s) not sent: they could not have finished inside the lease", len(unsent)
            )

    def _pool(self, name: str, size: int) -> ThreadPoolExecutor:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"cs-{name}")
        return pool

    # --- outcomes -> flag flips -----------------------------------------------------------------

    def _write_outcomes(
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
        missing = {r.id for r in rows} - set(outcomes)
        if missing:
            raise RuntimeError(f"stage {stage.name} returned no outcome for rows {sorted(missing)[:10]}")
        flags = stage.flags
        release = {flags.lease_owner.name: None, flags.lease_until.name: None} if owner else {}
        groups: dict[frozenset, dict[int, dict[str, Any]]] = defaultdict(dict)
        for row in rows:
            outcome, values = flip_for(stage, job, outcomes[row.id], getattr(row, flags.attempts.name), now)
            count_outcome(report, outcome)
            report.outcomes[row.id] = outcome
            log_outcome(stage, row.id, outcomes[row.id], outcome, values)
            if isinstance(outcome, Blocked):
                report.blocked = report.blocked or outcome.describe()
            values.update(release)
            groups[frozenset(values)][row.id] = values

        # One UPDATE per kind of outcome, however many rows and whatever their values:
        # a column whose value differs between rows is written with CASE id WHEN ... END.
        guard = [flags.scanned == 0] + ([flags.lease_owner == owner] if owner else [])
        for members in groups.values():
            matched = update_rows(conn, flags.table, members, *guard)
            if matched != len(members):
                raise LostClaim(f"{stage.name}: {len(members)} rows claimed, {matched} still ours")


def _owned_query(stage: Stage, ids: list[int], owner: str, mysql: bool):
    flags = stage.flags
    query = select(flags.table).where(flags.id.in_(ids), flags.lease_owner == owner, flags.scanned == 0)
    return query.with_for_update() if mysql else query


def _limits_text(limits: Mapping[str, float]) -> str:
    return ", ".join(f"{endpoint} {qps:g}/s" for endpoint, qps in sorted(limits.items())) or "none"


def _is_row_fault(exc: BaseException) -> bool:
    return not _not_a_row_fault(exc)


def _not_a_row_fault(exc: BaseException) -> bool:
    """The database, not a row, failed the batch: roll back and back off instead of isolating rows."""
    return is_transient_db_error(exc) or is_environment_db_error(exc) or isinstance(exc, LostClaim)


def _reset(report: BatchReport) -> None:
    report.claimed = report.done = report.failed = report.retried = report.later = report.skipped = 0
    report.blocked_rows = 0
    report.outcomes.clear()


def _accumulate(total: BatchReport, report: BatchReport) -> None:
    for attr in ("claimed", "done", "failed", "retried", "later", "skipped", "blocked_rows"):
        setattr(total, attr, getattr(total, attr) + getattr(report, attr))
    total.outcomes.update(report.outcomes)
    total.blocked = total.blocked or report.blocked


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return clip(text.splitlines()[0] if text else type(exc).__name__, 200)
