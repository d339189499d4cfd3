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
from datetime import datetime, timedelta, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from cancel_scanner.engine.clock import ClockWatch
from cancel_scanner.engine.errors import is_transient_db_error

MAX_BACKOFF_SECONDS = 60.0
CLOCK_CHECK_SECONDS = 60.0
# A tick runs full batches back to back, but yields after this long so a busy stage
# cannot hold its thread (and delay shutdown) indefinitely.
TICK_BUDGET_SECONDS = 10.0


class Blocked(Exception):
    """The environment stops a stage (see BatchReport.blocked)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _utc() -> datetime:
    return datetime.now(timezone.utc)


class Daemon:
    def __init__(self, app):  # anything with .runner and .config: the composition root's App
        self.app = app
        self.runner = app.runner
        self.config = app.config
        self.stages = [n for n in self.runner.stages if self.config.job(n).enabled]
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition()  # counts the ticks in hand, for shutdown
        self._active = 0
        self._running: dict[str, bool] = {n: False for n in self.stages}
        self._rerun: dict[str, bool] = {n: False for n in self.stages}
        self._failures: dict[str, int] = {n: 0 for n in self.stages}
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(1, len(self.stages)))},
            timezone=timezone.utc,
        )
        self._signals = 0
        self.clock_watch = ClockWatch(app.runner.clock.offset_seconds) if hasattr(app.runner.clock, "offset_seconds") else None
        self._clock_checked = float("-inf")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._check_clock()
        try:
            self.runner.registry.beat()
        except Exception as exc:  # the database may be down at start: the heartbeat thread retries
            logger.bind(stage="daemon", action="register_failed").warning("could not register yet: {}", type(exc).__name__)
        self.runner.registry.start(on_reaped=self._on_reaped, on_tick=self._check_clock)
        for name in self.stages:
            job = self.config.job(name)
            self.scheduler.add_job(
                self._tick,
                "interval",
                seconds=job.interval_seconds,
                args=[name],
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(job.interval_seconds * 2)),
                next_run_time=_utc(),
            )
        self.scheduler.start()
        logger.bind(stage="daemon", action="started", owner=self.runner.owner, stages=",".join(self.stages)).info(
            "cancel-scanner running"
        )

    def _on_reaped(self, owners: list[str]) -> None:
        # Their leases are free now: take the work over at once rather than at the next interval.
        for name in self.stages:
            if self.runner.stages[name].kind == "gateway":
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
            except Exception as exc:  # the database may be the reason we stop; leases expire anyway
                logger.bind(stage="daemon", action="release_failed").warning("could not release leases: {}", exc)
        else:
            # A gateway call may still be in flight: its lease must stay until it expires, or
            # another daemon could call WeChat for the same refund at the same time.
            logger.bind(stage="daemon", action="stop_timeout").warning(
                "batches still running after {:.0f}s; leaving their leases to expire", self.config.shutdown_timeout_seconds
            )
        logger.bind(stage="daemon", action="stopped", clean=clean, leases_released=released).info("cancel-scanner stopped")
        return clean

    # --- one scheduled run of a stage -----------------------------------------------------------

    def _tick(self, name: str) -> None:
        with self._lock:
            if self._running[name]:
                self._rerun[name] = True
                return
            self._running[name] = True
        with self._idle:
            self._active += 1
        try:
            while not self.stopped.is_set() and not self.runner.stopping.is_set():
                self._run_batches(name)
                with self._lock:
                    if not self._rerun[name]:
                        self._running[name] = False
                        return
                    self._rerun[name] = False
        finally:
            with self._lock:
                self._running[name] = False
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _run_batches(self, name: str) -> None:
        """Batches back to back while they come full; then hand off to the consumers.

        A gateway stage with a backlog runs a second lane: while one lane writes its answers
        and claims its next batch, the other is calling, so the shared pacer never idles.
        The lanes cannot collide: each claims with SKIP LOCKED and leases what it claimed.
        """
        started = time.monotonic()
        tally = {"handed_off": 0, "failed": False}
        tally_lock = threading.Lock()
        second_lane: threading.Thread | None = None

        def lane() -> None:
            nonlocal second_lane
            while not self.runner.stopping.is_set():
                try:
                    report = self.runner.run_stage(name)
                    error = report.error
                    if report.blocked:
                        error = Blocked(report.blocked)
                except Exception as exc:
                    report, error = None, exc
                if error is not None:
                    with tally_lock:
                        first_failure = not tally["failed"]
                        tally["failed"] = True
                    if first_failure:  # one backoff step per tick, whichever lane saw it
                        self._back_off(name, error)
                    return
                with tally_lock:
                    tally["handed_off"] += report.finished
                    if self._failures[name]:
                        logger.bind(stage=name, action="recovered", failures=self._failures[name]).info("stage recovered")
                        self._failures[name] = 0
                    if tally["failed"] or not report.full:
                        return
                    if second_lane is None and self.runner.stages[name].kind == "gateway":
                        second_lane = threading.Thread(target=lane, name=f"cs-{name}-lane2", daemon=True)
                        second_lane.start()
                if time.monotonic() - started > TICK_BUDGET_SECONDS:
                    # Still full: go round again at once (the loop in _tick checks for a stop
                    # first) instead of waiting for the next interval.
                    with self._lock:
                        self._rerun[name] = True
                    return

        lane()
        if second_lane is not None:
            second_lane.join()
        if tally["handed_off"]:
            for consumer, after in self.runner.stages[name].handoffs().items():
                self.wake(consumer, after=after)

    def wake(self, name: str, after: float = 0.0) -> None:
        """Run ``name`` now, or ``after`` seconds from now if that is sooner than its next run."""
        if name not in self._running or self._stopping() or self._failures[name]:
            return  # a stage backing off keeps its backoff: an early run would only fail again
        if after <= 0:
            with self._lock:
                if self._running[name]:
                    self._rerun[name] = True
                    return
        at = _utc() + timedelta(seconds=after)
        job = self.scheduler.get_job(name)
        if job is not None and (job.next_run_time is None or at < job.next_run_time):
            self._reschedule(name, at)

    def _stopping(self) -> bool:
        return self.stopped.is_set() or self.runner.stopping.is_set()

    def _reschedule(self, name: str, at: datetime) -> None:
        if self._stopping():
            return  # never touch the scheduler while it stops (see shutdown)
        try:
            self.scheduler.modify_job(name, next_run_time=at)
        except JobLookupError:  # removed between the check and now: nothing to move
            logger.bind(stage=name, action="reschedule_skipped").debug("job gone; not rescheduled")

    def _back_off(self, name: str, error) -> None:
        self._failures[name] += 1
        n = self._failures[name]
        interval = self.config.job(name).interval_seconds
        delay = min(MAX_BACKOFF_SECONDS, interval * 2 ** (n - 1))
        transient = isinstance(error, str) or is_transient_db_error(error)
        log = logger.bind(stage=name, action="backoff", failures=n, retry_in_s=round(delay, 1))
        text = error if isinstance(error, str) else f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if isinstance(error, Blocked):
            # Not a blip: privileges, schema or credentials. Loud on the first step, then once a minute.
            if n == 1 or delay >= MAX_BACKOFF_SECONDS:
                log.bind(action="blocked").error("stage blocked, a person must fix: {}; next try in {:.0f}s", error.reason, delay)
        elif transient:
            log.warning("stage unavailable ({}); next try in {:.0f}s", text, delay)
        else:
            log.opt(exception=error if n == 1 else None).error("stage failed ({}); next try in {:.0f}s", text, delay)
        self._reschedule(name, _utc() + timedelta(seconds=delay))
