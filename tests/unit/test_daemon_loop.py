"""The daemon's loop per stage, in-process on APScheduler, with a fake runner: what it does after each batch.

Full batch -> run again at once; finished rows -> wake the consumers; failure -> back off; a bug
in a stage -> reported, backed off, the other stages go on. Intervals are 60 s, so anything that
happens within a couple of seconds happened because of the loop, not the interval.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from cancel_scanner.engine.batch import Backoff, BatchReport, Worked
from cancel_scanner.engine.daemon import Daemon

INTERVAL = 60.0


class FakeStage:
    def __init__(self, name, feeds=(), kind="database"):
        self.name, self.kind, self._feeds = name, kind, feeds

    def handoffs(self):
        return {f: 0.0 for f in self._feeds}


class FakeRunner:
    """Answers run_stage from a script per stage; counts the runs."""

    def __init__(self, scripts, kinds=None, hold=None):
        self.scripts = {name: list(reports) for name, reports in scripts.items()}
        self.stages = {
            name: FakeStage(
                name, feeds=("consumer",) if name == "producer" else (), kind=(kinds or {}).get(name, "database")
            )
            for name in scripts
        }
        self.runs = {name: 0 for name in scripts}
        self.hold = hold or {}  # name -> predicate(runner): a run of that stage waits for it (at most hold_s)
        self.hold_s = 3.0
        self.in_flight = {name: 0 for name in scripts}
        self.most_in_flight = {name: 0 for name in scripts}
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.registry = SimpleNamespace(beat=lambda: None, start=lambda **kw: None, stop=lambda: None)
        self.clock = lambda: datetime(2026, 11, 1)
        self.owner = "fake"

    def lanes(self, name):
        return 2 if self.stages[name].kind == "gateway" else 1

    def holds_leases(self, name):
        return self.stages[name].kind == "gateway"

    def run_stage(self, name):
        with self.changed:
            self.runs[name] += 1
            self.in_flight[name] += 1
            self.most_in_flight[name] = max(self.most_in_flight[name], self.in_flight[name])
            self.changed.notify_all()
            script = self.scripts[name]
            step = script.pop(0) if script else BatchReport(stage=name)
        with self.changed:
            if name in self.hold:
                self.changed.wait_for(lambda: self.hold[name](self), timeout=self.hold_s)
            self.in_flight[name] -= 1
            self.changed.notify_all()
        if isinstance(step, BaseException):
            raise step
        return step

    def wait_runs(self, name, n, timeout=3.0):
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.runs[name] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def stop(self):
        self.stopping.set()

    def release_leases(self):
        return 0


def daemon_for(runner):
    jobs = {name: SimpleNamespace(enabled=True, interval_seconds=INTERVAL) for name in runner.stages}
    config = SimpleNamespace(job=jobs.__getitem__, shutdown_timeout_seconds=5)
    return Daemon(SimpleNamespace(runner=runner, config=config))


def full(name):
    return BatchReport(stage=name, claimed=10, done=10, batch_size=10, result=Worked(full=True))


def test_a_full_batch_runs_again_at_once_and_an_idle_one_waits_for_the_interval():
    runner = FakeRunner({"producer": [full("producer")] * 3, "consumer": []})
    daemon = daemon_for(runner)
    daemon.start()
    try:
        assert runner.wait_runs("producer", 4)  # three full batches, then the empty one
        assert not runner.wait_runs("producer", 5, timeout=0.5)  # idle: next run is INTERVAL away
    finally:
        assert daemon.shutdown()


def test_finished_rows_wake_the_consuming_stage_at_once():
    runner = FakeRunner(
        {
            "producer": [
                BatchReport(stage="producer"),
                BatchReport(stage="producer", claimed=1, done=1, batch_size=10, result=Worked()),
            ],
            "consumer": [],
        }
    )
    daemon = daemon_for(runner)
    daemon.start()
    try:
        assert runner.wait_runs("consumer", 1) and runner.wait_runs("producer", 1)
        daemon.wake("producer")  # a new row: the producer finishes one
        assert runner.wait_runs("producer", 2)
        assert runner.wait_runs("consumer", 2), "the consumer was not woken by the hand-off"
    finally:
        assert daemon.shutdown()


def test_a_failing_stage_backs_off_and_a_bug_in_one_stage_stops_no_other():
    runner = FakeRunner(
        {
            "producer": [BatchReport(stage="producer", result=Backoff("OperationalError 2013: Lost connection"))],
            "consumer": [RuntimeError("a bug in the stage")],
        }
    )
    daemon = daemon_for(runner)
    before = datetime.now(UTC)
    daemon.start()
    try:
        assert runner.wait_runs("producer", 1) and runner.wait_runs("consumer", 1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and daemon.loops["consumer"].failures < 1:
            time.sleep(0.01)  # polling a condition with a deadline
        for name in ("producer", "consumer"):
            next_run = daemon.scheduler.get_job(name).next_run_time
            # First backoff step: one interval from the failure, not "now".
            assert next_run >= before + timedelta(seconds=INTERVAL * 0.9), name
        assert {n: loop.failures for n, loop in daemon.loops.items()} == {"producer": 1, "consumer": 1}
        daemon.wake("producer", after=0)  # a hand-off does not cut a backoff short
        assert not runner.wait_runs("producer", 2, timeout=0.5)
    finally:
        assert daemon.shutdown()


def test_a_wake_during_a_run_asks_for_exactly_one_more_round():
    release = threading.Event()
    runner = FakeRunner({"producer": [], "consumer": []}, hold={"producer": lambda _: release.is_set()})
    daemon = daemon_for(runner)
    daemon.start()
    try:
        assert runner.wait_runs("producer", 1)  # running, held
        for _ in range(3):
            daemon.wake("producer")  # three wakes while it runs: one more round, not three
        with runner.changed:
            release.set()
            runner.changed.notify_all()
        assert runner.wait_runs("producer", 2), "the wake during the run was lost"
        assert not runner.wait_runs("producer", 3, timeout=0.5)
    finally:
        release.set()
        assert daemon.shutdown()


def second_call_overlaps(runner):
    """Hold every batch after the first until another call is in flight beside it (or the backlog is gone)."""
    return runner.runs["producer"] == 1 or runner.in_flight["producer"] >= 2 or not runner.scripts["producer"]


def test_a_gateway_stage_with_a_backlog_calls_on_two_lanes():
    runner = FakeRunner(
        {"producer": [full("producer")] * 4, "consumer": []},
        kinds={"producer": "gateway"},
        hold={"producer": second_call_overlaps},
    )
    daemon = daemon_for(runner)
    daemon.start()
    try:
        assert runner.wait_runs("producer", 5)
        assert runner.most_in_flight["producer"] == 2  # two lanes, never more
    finally:
        assert daemon.shutdown()


def test_a_database_stage_runs_its_batches_one_at_a_time():
    runner = FakeRunner({"producer": [full("producer")] * 3, "consumer": []}, hold={"producer": second_call_overlaps})
    runner.hold_s = 0.5  # the second batch waits for a partner that never comes
    daemon = daemon_for(runner)
    daemon.start()
    try:
        assert runner.wait_runs("producer", 4)
        assert runner.most_in_flight["producer"] == 1
    finally:
        assert daemon.shutdown()


def test_a_daily_job_catches_up_at_start_and_tries_again_when_it_asks_to():
    """Reconciliation's shape: not ready yet (the bill is being made) -> again after the delay it asked for."""
    from cancel_scanner.engine.daemon import DailyJob

    runner = FakeRunner({"producer": []})
    daemon = daemon_for(runner)
    answers = [0.2, 0.2, None]  # twice "not yet", then done
    ran = threading.Semaphore(0)
    calls = []

    def job():
        calls.append(time.monotonic())
        ran.release()
        return answers.pop(0) if answers else None

    daemon.add_daily(DailyJob("reconcile", "10:00", job, catch_up=True))
    daemon.add_daily(DailyJob("prune", "04:00", lambda: calls.append("prune")))  # no catch-up: waits for 04:00
    daemon.start()
    try:
        for _ in range(3):
            assert ran.acquire(timeout=5)
        assert not ran.acquire(timeout=0.5)  # done for the day: no fourth run
        assert "prune" not in calls and len(calls) == 3
        assert calls[1] - calls[0] >= 0.19 and calls[2] - calls[1] >= 0.19
        (cron,) = [j for j in daemon.scheduler.get_jobs() if j.id == "daily:reconcile"]
        assert (cron.next_run_time.utcoffset().total_seconds(), cron.next_run_time.hour, cron.next_run_time.minute) == (
            8 * 3600,
            10,
            0,
        )
    finally:
        assert daemon.shutdown()
