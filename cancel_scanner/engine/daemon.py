"""The daemon: one APScheduler job per enabled stage, fast hand-offs, backoff, clean stops.

A stage whose batch was full runs again at once; a stage that finished rows wakes
the stage that consumes them, so one request on an idle daemon reaches "refund
submitted" within about one interval, not six. A stage that fails (database
down) backs off exponentially and logs once per step. SIGTERM/SIGINT: stop
claiming, let the batches in hand finish (each is one short transaction, or a
gateway round bounded by the timeouts), release leases, exit 0; a second signal
exits at once, which is safe because every stage is idempotent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from loguru import logger

from cancel_scanner.engine.batch import Again, BatchReport, Fail, Streak, next_step
from cancel_scanner.engine.clock import ClockWatch
from cancel_scanner.engine.errors import is_transient_db_error
from cancel_scanner.engine.progress import Progress

MAX_BACKOFF_SECONDS = 60.0
CLOCK_CHECK_SECONDS = 60.0
# A tick runs full batches back to back, but yields after this long so a busy stage
# cannot hold its thread (and delay shutdown) indefinitely.
TICK_BUDGET_SECONDS = 10.0


class Blocked(Exception):
    """The environment stops a stage (a batch's result was engine.batch.Blocked)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _utc() -> datetime:
    return datetime.now(UTC)


BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")  # China keeps no daylight saving time


@dataclass(frozen=True)
class DailyJob:
    """Work done once a day at ``at`` (HH:MM, Beijing time), beside the stages: reconciliation, pruning.

    ``run()`` returns None when the day's work is done, or the seconds after which to try again
    (WeChat's bill not ready yet). It must be idempotent: a stop or a crash may cut it anywhere.
    With ``catch_up`` it also runs once right after the daemon starts (it decides itself whether
    anything is due).
    """

    name: str
    at: str
    run: Callable[[], float | None]
    catch_up: bool = False


class Daemon:
    def __init__(self, app):  # anything with .runner and .config: the composition root's App
        self.app = app
        self.runner = app.runner
        self.config = app.config
        self.stages = [n for n in self.runner.stages if self.config.job(n).enabled]
        self.stopped = threading.Event()
        self._idle = threading.Condition()  # counts the ticks in hand, for shutdown
        self._active = 0
        self.loops = {n: StageLoop(self, n) for n in self.stages}
        # An observer of each stage going down (backing off) and up again: the monitoring's stage_up.
        self.on_stage_state: Callable[[str, bool], None] | None = None
        # Rows finished and stages down, published with every heartbeat for `status` to read.
        self.progress = Progress(self.stages)
        self.runner.registry.report = self.progress.report
        self.daily: list[DailyJob] = []  # add_daily() before start()
        self.scheduler = BackgroundScheduler(
            # Daily jobs on an executor of their own: a long reconciliation never holds a stage's thread.
            executors={
                "default": ThreadPoolExecutor(max_workers=max(1, len(self.stages))),
                "daily": ThreadPoolExecutor(max_workers=1),
            },
            timezone=UTC,
        )
        self._signals = 0
        self.clock_watch = (
            ClockWatch(app.runner.clock.offset_seconds) if hasattr(app.runner.clock, "offset_seconds") else None
        )
        self._clock_checked = float("-inf")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._check_clock()
        try:
            self.runner.registry.beat()
        except Exception as exc:  # noqa: BLE001 - the database may be down at start: the heartbeat thread retries
            logger.bind(stage="daemon", action="register_failed").warning(
                "could not register yet: {}", type(exc).__name__
            )
        self.runner.registry.start(on_reaped=self._on_reaped, on_tick=self._check_clock)
        for name in self.stages:
            job = self.config.job(name)
            self.scheduler.add_job(
                self.loops[name].tick,
                "interval",
                seconds=job.interval_seconds,
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(job.interval_seconds * 2)),
                next_run_time=_utc(),
            )
        for daily in self.daily:
            hour, minute = (int(part) for part in daily.at.split(":"))
            self.scheduler.add_job(
                self._daily_tick,
                CronTrigger(hour=hour, minute=minute, timezone=BEIJING),
                args=(daily,),
                id=f"daily:{daily.name}",
                name=daily.name,
                executor="daily",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=3_600,
            )
            if daily.catch_up:
                self._daily_again(daily, 1)
        self.scheduler.start()
        logger.bind(stage="daemon", action="started", owner=self.runner.owner, stages=",".join(self.stages)).info(
            "cancel-scanner running"
        )

    def add_daily(self, job: DailyJob) -> None:
        self.daily.append(job)

    def _daily_tick(self, job: DailyJob) -> None:
        if self.stopping():
            return
        log = logger.bind(stage=job.name, action="daily")
        try:
            again = job.run()
        except Exception as exc:  # noqa: BLE001 - the job's own failures are its to report; this keeps the schedule alive
            log.opt(exception=exc).error("daily job {} failed: {}", job.name, type(exc).__name__)
            again = 1_800.0
        if again is not None and not self.stopping():
            try:
                self._daily_again(job, again, replace_existing=True)
            except Exception as exc:  # noqa: BLE001 - the scheduler stops: nothing to reschedule
                log.debug("not rescheduled: {}", type(exc).__name__)

    def _daily_again(self, job: DailyJob, seconds: float, replace_existing: bool = False) -> None:
        """``job`` once more, ``seconds`` from now, besides its daily run (a catch-up, or the retry it asked for)."""
        self.scheduler.add_job(
            self._daily_tick,
            "date",
            args=(job,),
            id=f"daily:{job.name}:again",
            executor="daily",
            run_date=_utc() + timedelta(seconds=seconds),
            replace_existing=replace_existing,
        )

    def _on_reaped(self, owners: list[str]) -> None:
        # Their leases are free now: take the work over at once rather than at the next interval.
        for name in self.stages:
            if self.runner.holds_leases(name):
                self.wake(name)

    def _check_clock(self) -> None:
        if self.clock_watch is None or time.monotonic() - self._clock_checked < CLOCK_CHECK_SECONDS:
            return
        self._clock_checked = time.monotonic()
        self.clock_watch.check()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self._signals += 1
        if self._signals > 1:
            # Every stage is idempotent and every lease expires: leaving now loses nothing.
            os._exit(128 + signum)
        logger.bind(stage="daemon", action="stopping", signal=signal.Signals(signum).name).info(
            "stopping: finishing the batches in hand (a second signal exits at once)"
        )
        self.stopped.set()

    def wait(self) -> None:
        while not self.stopped.wait(0.5):
            pass

    def shutdown(self) -> bool:
        """Stop cleanly within the configured bound; True if every batch finished in time.

        Waits for the ticks in hand itself, then stops the scheduler without waiting: APScheduler's
        shutdown(wait=True) holds its job-store lock while it waits, and a tick that backs off
        or wakes a consumer needs that lock, so the two would wait for each other.
        """
        self.runner.stop()
        started = self.scheduler.running  # not when start() itself failed
        if started:
            self.scheduler.pause()
        deadline = time.monotonic() + self.config.shutdown_timeout_seconds
        with self._idle:
            clean = self._idle.wait_for(lambda: self._active == 0, timeout=max(0.0, deadline - time.monotonic()))
        if started:
            self.scheduler.shutdown(wait=False)
        self.runner.registry.stop()
        released = 0
        if clean:
            try:
                released = self.runner.release_leases()
            except Exception as exc:  # noqa: BLE001 - the database may be the reason we stop; leases expire anyway
                logger.bind(stage="daemon", action="release_failed").warning("could not release leases: {}", exc)
        else:
            # A gateway call may still be in flight: its lease must stay until it expires, or
            # another daemon could call WeChat for the same refund at the same time.
            logger.bind(stage="daemon", action="stop_timeout").warning(
                "batches still running after {:.0f}s; leaving their leases to expire",
                self.config.shutdown_timeout_seconds,
            )
        logger.bind(stage="daemon", action="stopped", clean=clean, leases_released=released).info(
            "cancel-scanner stopped"
        )
        return clean

    # --- what the stage loops ask of the daemon ------------------------------------------------

    def wake(self, name: str, after: float = 0.0) -> None:
        """Run ``name`` now, or ``after`` seconds from now if that is sooner than its next run."""
        loop = self.loops.get(name)
        if loop is None or self.stopping() or loop.failures:
            return  # a stage backing off keeps its backoff: an early run would only fail again
        if after <= 0 and loop.ask_again():
            return  # running: it goes round once more when this round ends
        at = _utc() + timedelta(seconds=after)
        job = self.scheduler.get_job(name)
        if job is not None and (job.next_run_time is None or at < job.next_run_time):
            self._reschedule(name, at)

    def tick_started(self) -> None:
        with self._idle:
            self._active += 1

    def tick_ended(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def stopping(self) -> bool:
        return self.stopped.is_set() or self.runner.stopping.is_set()

    def _reschedule(self, name: str, at: datetime) -> None:
        if self.stopping():
            return  # never touch the scheduler while it stops (see shutdown)
        try:
            self.scheduler.modify_job(name, next_run_time=at)
        except JobLookupError:  # removed between the check and now: nothing to move
            logger.bind(stage=name, action="reschedule_skipped").debug("job gone; not rescheduled")

    def back_off(self, name: str, failures: int, error) -> None:
        self.progress.stage_down(name, error)
        if self.on_stage_state is not None:
            self.on_stage_state(name, False)
        interval = self.config.job(name).interval_seconds
        delay = min(MAX_BACKOFF_SECONDS, interval * 2 ** (failures - 1))
        log_failure(name, failures, delay, error)
        self._reschedule(name, _utc() + timedelta(seconds=delay))


def log_failure(name: str, failures: int, delay: float, error) -> None:
    """One line per backoff step, as loud as the cause deserves."""
    log = logger.bind(stage=name, action="backoff", failures=failures, retry_in_s=round(delay, 1))
    if isinstance(error, Blocked):
        # Not a blip: privileges, schema or credentials. Loud on the first step, then once a minute.
        if failures == 1 or delay >= MAX_BACKOFF_SECONDS:
            log.bind(action="blocked").error(
                "stage blocked, a person must fix: {}; next try in {:.0f}s", error.reason, delay
            )
        return
    if isinstance(error, str):  # a batch that rolled back says why in words: a blip by definition
        text, transient = error, True
    else:
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        text, transient = f"{type(error).__name__}: {first_line}", is_transient_db_error(error)
    if transient:
        log.warning("stage unavailable ({}); next try in {:.0f}s", text, delay)
    else:
        log.opt(exception=error if failures == 1 else None).error("stage failed ({}); next try in {:.0f}s", text, delay)


class _Round:
    """What the lanes of one round of a stage learn together: rows finished, whether one failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.finished = 0
        self.failed = False
        self.more_lanes: list[threading.Thread] = []


class StageLoop:
    """One stage on the scheduler: batches back to back while ``next_step`` says again, then idle.

    APScheduler calls ``tick`` every interval (never twice at once: max_instances=1). A wake that
    arrives while a tick runs asks for one more round instead of queueing a run, so a hand-off is
    never lost and never doubled. A failure backs the stage off; a full batch past the tick
    budget yields and goes round again.
    """

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.stage = daemon.runner.stages[name]
        self.lanes = daemon.runner.lanes(name)
        self.failures = 0
        self.streak = Streak()  # races lost and batches paced in a row, across rounds
        self._lock = threading.Lock()
        self._running = False
        self._again = False

    def ask_again(self) -> bool:
        """If a round is running, have it go round once more and say so; else False."""
        with self._lock:
            if self._running:
                self._again = True
            return self._running

    def tick(self) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running, self._again = True, False
        self.daemon.tick_started()
        try:
            while not self.daemon.stopping() and self._round():
                pass
        finally:
            with self._lock:
                self._running = False
            self.daemon.tick_ended()

    def _round(self) -> bool:
        """One round of lanes, then the hand-offs; True if another round was asked for."""
        round_ = _Round()
        self._lane(round_)
        for lane in round_.more_lanes:
            lane.join()
        if round_.finished:
            for consumer, after in self.stage.handoffs().items():
                self.daemon.wake(consumer, after=after)
        with self._lock:
            again, self._again = self._again, False
        return again

    def _lane(self, round_: _Round) -> None:
        """Batches while ``next_step`` says again, until a failure or the tick budget is spent.

        A stage with a backlog whose batches may overlap (a gateway stage: while one lane writes its
        answers and claims its next batch, the other is calling) runs more lanes, up to its ``lanes``.
        """
        stopping = self.daemon.runner.stopping
        while not stopping.is_set():
            report, raised = self._batch()
            with round_.lock:
                round_.finished += report.finished
                if report.claimed:
                    self.daemon.progress.batch_done(report)
                if round_.failed:
                    return  # another lane of this round failed and backed the stage off
                if raised is not None:
                    self._fail(round_, raised)
                    return
                step, self.streak = next_step(report.result, self.streak)
                if isinstance(step, Fail):
                    self._fail(round_, Blocked(step.reason) if step.blocked else step.reason)
                    return
                self._recovered()
                if not isinstance(step, Again):
                    return
                if step.after == 0 and 1 + len(round_.more_lanes) < self.lanes:
                    lane = threading.Thread(
                        target=self._lane,
                        args=(round_,),
                        daemon=True,
                        name=f"cs-{self.name}-lane{2 + len(round_.more_lanes)}",
                    )
                    round_.more_lanes.append(lane)
                    lane.start()
            if time.monotonic() - round_.started > TICK_BUDGET_SECONDS:
                # Still busy: go round again at once (tick checks for a stop first) instead of
                # waiting for the next interval.
                with self._lock:
                    self._again = True
                return
            if step.after and stopping.wait(step.after):
                return

    def _fail(self, round_: _Round, error: Any) -> None:
        """One backoff step per round, whichever lane saw the failure (called holding round_.lock)."""
        round_.failed = True
        self.failures += 1
        self.daemon.back_off(self.name, self.failures, error)

    def _batch(self) -> tuple[BatchReport, Exception | None]:
        """The batch's report, and the exception of a stage that raised (a bug): a failure like any
        other, reported and backed off by the caller, never swallowed."""
        try:
            return self.daemon.runner.run_stage(self.name), None
        except Exception as exc:  # noqa: BLE001 - a stage's bug backs the stage off, never the daemon
            return BatchReport(stage=self.name), exc

    def _recovered(self) -> None:
        if self.failures:
            logger.bind(stage=self.name, action="recovered", failures=self.failures).info("stage recovered")
            self.failures = 0
            self.daemon.progress.stage_up(self.name)
            if self.daemon.on_stage_state is not None:
                self.daemon.on_stage_state(self.name, True)
