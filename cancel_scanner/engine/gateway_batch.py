"""A gateway stage's batch: named steps, and no transaction is open during a call.

1. ``_budget`` and ``_lease``: ask the gateway how many calls it can start within the lease, claim
   that many rows, lease them (lease_owner, lease_until, on the database's clock), commit;
2. ``_call_all``: call the gateway with bounded concurrency. Every call carries a deadline (the
   lease, and the registry's heartbeat window, whichever ends first): the gateway sends it only if
   it can still finish by then, re-checks right before the bytes leave, and cuts it off at the
   deadline. So a process paused past its lease sends nothing when it resumes, and no two
   processes ever have a call in flight for the same row;
3. ``_write_answers``: re-read the rows still leased to us (the fencing check: a row taken over by
   another process drops our answer), write what the gateway said, flip the flags, release the
   leases, commit. A crash before 3 leaves the row leased until the registry releases it; any
   process then retries it with the same request number, which the gateway answers with the
   original result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Engine, Row, select, update

from cancel_scanner.engine.batch import Backoff, BatchReport, Hooks, Paced
from cancel_scanner.engine.claim import Claimer
from cancel_scanner.engine.clock import MIN_CALL_SECONDS
from cancel_scanner.engine.config import LEASE_SAFETY_MARGIN_SECONDS
from cancel_scanner.engine.facts import resolve_facts
from cancel_scanner.engine.isolate import isolate
from cancel_scanner.engine.outcome import OUTCOME_UNKNOWN, Done, Failed, Outcome, Retry, clip
from cancel_scanner.engine.registry import Registry
from cancel_scanner.engine.settings import GatewayJobSettings
from cancel_scanner.engine.sql import update_rows
from cancel_scanner.engine.stage import GatewayStage
from cancel_scanner.engine.writes import FlagWriter, Write, is_row_fault

# A gateway batch leases no more rows than the pacer can start calls for within this long: the rest
# stay in the shared pool, so N daemons splitting one merchant's pace end a backlog together instead
# of one of them calling out a long lease alone. At 150/s it is still a full batch of 200.
CLAIM_AHEAD_SECONDS = 2.0
NO_HEARTBEAT = "no fresh heartbeat in the process registry"


class _CallCrashed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _NotStarted:
    """The runner stopped before this row's call began."""


_NOT_STARTED = _NotStarted()


class GatewayBatch:
    # Two batches of a stage with a backlog at once: while one writes its answers and claims its next
    # rows, the other is calling, so the shared pacer never idles. They cannot collide: each claims
    # with SKIP LOCKED and leases what it claimed.
    lanes = 2

    def __init__(
        self,
        db: Engine,
        stage: GatewayStage,
        gateway: Any,
        *,
        claimer: Claimer,
        writer: FlagWriter,
        registry: Registry,
        pace: Any,
        hooks: Hooks,
        stopping: threading.Event,
        monotonic: Callable[[], float],
        mysql: bool,
    ):
        self.db = db
        self.stage = stage
        if stage.flags.lease_owner is None or stage.flags.lease_until is None:
            raise ValueError(f"gateway stage {stage.name} needs lease columns in its flags")
        self.owner_col, self.until_col = stage.flags.lease_owner, stage.flags.lease_until
        self.gateway = gateway  # calls_within(endpoint, seconds), and whatever the stage's call() uses
        self.claimer = claimer
        self.writer = writer
        self.registry = registry
        self.pace = pace  # the gateway's PaceShare (ready, held_for), or None: this process paces alone
        self.hooks = hooks
        self.stopping = stopping
        self.monotonic = monotonic
        self.mysql = mysql
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # both lanes may make their first call at once

    def run(self, job: GatewayJobSettings, clock: Callable[[], datetime], report: BatchReport) -> None:
        stage, registry = self.stage, self.registry
        if not registry.threaded:
            registry.tick()  # no heartbeat thread (run --once, tests): beat and reap before every lease
        if not self._paced_in_time(report):
            return
        owner = registry.owner
        leased_at = self.monotonic()
        safe_until = registry.safe_until(owner)
        if safe_until - leased_at < MIN_CALL_SECONDS:
            # No fresh heartbeat: whatever we leased could not be called, and survivors may be
            # about to take our rows. Back off until the heartbeat lands again.
            report.result = Backoff(registry.last_error or NO_HEARTBEAT)
            return
        lease_deadline = leased_at + job.lease_seconds - LEASE_SAFETY_MARGIN_SECONDS
        limit = self._budget(job, min(lease_deadline, safe_until) - leased_at)
        if limit <= 0:
            report.result = Paced()  # the pacer is booked for longer than a lease: claiming now would only idle rows
            return
        report.batch_size = limit  # "full" means: got all it asked for, so look again at once
        rows = self._lease(job, clock(), limit, owner)
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
            results = self._call_all(job, rows, deadline)
            self._write_answers(job, [r.id for r in rows], results, clock(), owner, report)
        except Exception:
            # Every call of the batch is over (or never started): give the rows back now rather than
            # at lease expiry. Their answers are lost, and the replay with the same number is safe.
            self._release_after_failure(rows, owner)
            raise

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # --- 1. budget and lease --------------------------------------------------------------------

    def _paced_in_time(self, report: BatchReport) -> bool:
        """False (and the report says why) while the merchant's processes are not counted yet; waits
        out a newcomer's hold (two heartbeats) here rather than look idle."""
        pace = self.pace
        if pace is None:
            return True
        if not pace.ready:
            if self.registry.safe_until() - self.monotonic() < MIN_CALL_SECONDS:
                # No heartbeat has landed yet (the database is away): a failure to back off on, not a pace.
                report.result = Backoff(self.registry.last_error or NO_HEARTBEAT)
            else:
                report.result = Paced()  # the heartbeat thread has not counted the merchant's processes yet
            return False
        held = pace.held_for(self.stage.endpoint)
        if held > 0:
            if self.stopping.wait(held):
                return False
            if not self.registry.threaded:
                self.registry.tick()  # the wait outlived the last beat's window
        return True

    def _budget(self, job: GatewayJobSettings, window: float) -> int:
        """Lease no more rows than the pacer can start calls for within ``window`` seconds (the lease or
        the heartbeat window, less the time one call needs) and CLAIM_AHEAD_SECONDS, so N processes at
        any QPS progress and share a backlog to its end."""
        if self.gateway is None:
            return job.batch_size  # nothing to call: the claim finds no ready row or fails loudly later
        # A fifth of the window is slack for the lease's own transaction and thread wake-ups.
        usable = max(0.0, window * 0.8 - MIN_CALL_SECONDS)
        endpoint = self.stage.endpoint
        capacity = self.gateway.calls_within(endpoint, usable)
        if capacity is None:
            return job.batch_size
        # At least one row whenever one call fits the window, so a slow pace still makes progress.
        ahead = self.gateway.calls_within(endpoint, min(CLAIM_AHEAD_SECONDS, usable)) or 0
        return min(job.batch_size, capacity, max(ahead, 1 if capacity else 0))

    def _lease(self, job: GatewayJobSettings, now: datetime, limit: int, owner: str) -> list[Row]:
        stage = self.stage
        flags = stage.flags
        with self.db.begin() as conn:
            # Every N-th id, not blocks: a batch of a few seconds of pace inserts nothing whose index
            # neighbours another daemon's rows.
            rows, waits = stage.admit(conn, self.claimer.claim(conn, stage, now, limit, block=1), now)
            if waits:
                update_rows(
                    conn,
                    flags.table,
                    {
                        row_id: {flags.next_attempt_at.name: wait.at, flags.last_error.name: clip(wait.why)}
                        for row_id, wait in waits.items()
                    },
                )
                logger.bind(stage=stage.name, action="waiting", rows=len(waits)).debug(
                    "{} row(s) wait for the channel's rules: {}", len(waits), next(iter(waits.values())).why
                )
            if rows:
                conn.execute(
                    update(flags.table)
                    .where(flags.id.in_([r.id for r in rows]))
                    .values(
                        {
                            self.owner_col: owner,
                            self.until_col: now + timedelta(seconds=job.lease_seconds),
                            **({stage.flags.sent: 1} if stage.flags.sent is not None else {}),
                        }
                    )
                )
        if rows:
            logger.bind(stage=stage.name, action="leased", rows=len(rows)).debug(
                "rows leased for {:g}s", job.lease_seconds
            )
        return rows

    def _release_after_failure(self, rows: Sequence[Row], owner: str) -> None:
        flags = self.stage.flags
        try:
            with self.db.begin() as conn:
                update_rows(
                    conn,
                    flags.table,
                    {r.id: {self.owner_col.name: None, self.until_col.name: None} for r in rows},
                    self.owner_col == owner,
                )
        except Exception as exc:  # noqa: BLE001 - the database is the reason: the reaper or lease expiry frees them
            logger.bind(stage=self.stage.name, action="release_failed").debug(
                "leases not released: {}", type(exc).__name__
            )

    # --- 2. the calls ---------------------------------------------------------------------------

    def _call_all(
        self, job: GatewayJobSettings, rows: Sequence[Row], deadline: Callable[[], float]
    ) -> list[tuple[Row, Any]]:
        stage = self.stage
        log = logger.bind(stage=stage.name)

        def call_one(row: Row) -> tuple[Row, Any]:
            if self.stopping.is_set():
                return row, _NOT_STARTED
            try:
                result = stage.call(self.gateway, row, deadline)
            except Exception as exc:  # noqa: BLE001 - a bug in the client: the outcome is unknown, never success
                log.opt(exception=exc).bind(row_id=row.id, action="call_crashed").warning("gateway call raised")
                result = _CallCrashed(exc)
            if self.hooks.after_gateway_call:
                self.hooks.after_gateway_call(stage.name, row, result)
            return row, result

        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=job.concurrency, thread_name_prefix=f"cs-{stage.name}")
            pool = self._pool
        return list(pool.map(call_one, rows))

    # --- 3. the answers -------------------------------------------------------------------------

    def _write_answers(
        self,
        job: GatewayJobSettings,
        ids: list[int],
        results: list[tuple[Row, Any]],
        now: datetime,
        owner: str,
        report: BatchReport,
    ) -> None:
        stage = self.stage
        log = logger.bind(stage=stage.name)
        with self.db.begin() as conn:
            w = Write(conn, stage, job, now, owner)
            # The fencing check: only rows still leased to this owner. If our lease was released
            # (we were declared dead) or taken over, the other holder's answer wins and ours is dropped.
            owned = {r.id: r for r in conn.execute(self._owned_query(ids, owner)).all()}
            called: list[tuple[Row, Any]] = []
            unsent: list[Row] = []
            crashed: dict[int, Outcome] = {}
            for row, result in results:
                if row.id not in owned:
                    log.bind(row_id=row.id, action="lease_lost").warning(
                        "lease lost before the answer was written; answer dropped"
                    )
                    continue
                if isinstance(result, _CallCrashed):
                    # The client raised: the bytes may have left, so this is an unknown outcome.
                    crashed[row.id] = Retry(
                        "CLIENT_ERROR",
                        f"{type(result.exc).__name__}: {_first_line(result.exc)}",
                        give_up_code=OUTCOME_UNKNOWN,
                    )
                elif result is _NOT_STARTED or stage.not_sent(result):
                    unsent.append(row)  # the row as leased: its values from before the lease
                else:
                    called.append((owned[row.id], result))
            outcomes: dict[int, Outcome] = {}

            def answer(part: list[tuple[Row, Any]]) -> BatchReport:
                said = dict(stage.apply(conn, part, now))
                written = BatchReport(stage=stage.name)
                self.writer.outcomes(w, [row for row, _ in part], said, written)
                # What the channel did is recorded now for the rows this try finished (a fact kept by
                # an earlier try of theirs is closed); a row still pending keeps its fact open.
                finished = [i for i, o in written.outcomes.items() if isinstance(o, (Done, Failed))]
                if finished:
                    resolve_facts(conn, stage.name, finished, now)
                return written

            done = isolate(conn, called, answer, is_row_fault)
            for part in done.results:
                report.add(part)
                outcomes.update(part.outcomes)
            if done.faults:
                self.writer.faults(w, [(row, exc, result) for (row, result), exc in done.faults], report)
                outcomes.update(
                    {row.id: report.outcomes[row.id] for (row, _), _ in done.faults if row.id in report.outcomes}
                )
            if crashed:
                self.writer.alone(w, [owned[i] for i in crashed], crashed, report)
                outcomes.update(crashed)
            self._release_unsent(conn, unsent, owner, report)
            if self.hooks.before_commit:
                self.hooks.before_commit(stage.name, list(outcomes))

    def _owned_query(self, ids: list[int], owner: str):
        flags = self.stage.flags
        query = select(flags.table).where(flags.id.in_(ids), self.owner_col == owner, flags.scanned == 0)
        return query.with_for_update() if self.mysql else query

    def _as_before(self, row: Row) -> dict[str, Any]:
        """The "may have gone out" mark of a row whose call never left, as it was before its lease."""
        sent = self.stage.flags.sent
        return {sent.name: getattr(row, sent.name)} if sent is not None else {}

    def _release_unsent(self, conn: Connection, unsent: list[Row], owner: str, report: BatchReport) -> None:
        """Rows whose call never left: give them back as they were, no attempt spent."""
        if not unsent:
            return
        stage = self.stage
        flags = stage.flags
        values = {
            row.id: {self.owner_col.name: None, self.until_col.name: None, **self._as_before(row)} for row in unsent
        }
        update_rows(conn, flags.table, values, self.owner_col == owner)
        report.skipped += len(unsent)
        report.claimed += len(unsent)
        if not self.stopping.is_set():
            logger.bind(stage=stage.name, action="calls_not_sent", rows=len(unsent)).info(
                "{} call(s) not sent (no time left inside the lease, or a channel this process does not serve):"
                " given back, no attempt spent",
                len(unsent),
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return clip(text.splitlines()[0] if text else type(exc).__name__, 200)
