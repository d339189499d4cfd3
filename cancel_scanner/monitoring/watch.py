"""The watcher: every ``monitoring.refresh_seconds``, one snapshot of the database, then the gauges,
the alert rules and the status page's data from it, on a thread of its own.

A stage never waits for it: the snapshot is read on the watcher's own connection, the rules run
on what it read, and messages only go into the notifier's queue. When the database cannot be
read, the gauges and the page keep their last reading (the page says how old it is), the
database rules keep their state, and the process rules (WeChat failures, stages down, the clock)
are still evaluated.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from cancel_scanner.monitoring.snapshot import Snapshot, take_snapshot

_log = logger.bind(stage="monitoring")
FIRST_BEAT_POLL_SECONDS = 0.5  # until the reading lists this daemon itself
FIRST_BEAT_POLLS = 20
STOP_WAIT_SECONDS = 1.0


class Watcher:
    def __init__(
        self,
        db: Any,
        stages: dict[str, Any],
        runner: Any,
        interval: float,
        *,
        takeover_seconds: float,
        metrics: Any = None,
        book: Any = None,  # an alerts AlertBook, or None when alerts are off
        calls: Any = None,  # the alerts CallWindow the gateway's answers feed
        down: Callable[[], dict] = dict,  # the daemon's stages backing off: Progress.down
        clock_offset: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        reconcile_expected: bool = False,
    ) -> None:
        self.db, self.stages, self.runner, self.interval = db, stages, runner, interval
        self.takeover_seconds = takeover_seconds
        self.metrics, self.book, self.calls, self.down = metrics, book, calls, down
        self.clock_offset, self.wall = clock_offset, wall
        self.reconcile_expected = reconcile_expected
        self.host = f"{socket.gethostname()}:{os.getpid()}"
        self.latest: Snapshot | None = None
        self._first_polls_left = FIRST_BEAT_POLLS
        self.last_error: str | None = None  # why the last reading failed, None once one succeeds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cs-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        # Holds nothing the exit needs: a reading stuck on the database (a lock, an outage) is left
        # to its daemon thread rather than added to the shutdown's bound.
        self._stop.set()
        self._thread.join(timeout=STOP_WAIT_SECONDS)

    def read(self) -> Snapshot:
        """One snapshot of the database (raises when it cannot be read)."""
        return take_snapshot(
            self.db,
            self.stages,
            self.runner.clock(),
            takeover_seconds=self.takeover_seconds,
            owner=self.runner.owner,
            lease_columns=self.runner.lease_columns(),
            wall_now=self.wall(),
        )

    def once(self) -> Snapshot | None:
        """Read, then publish: gauges, page data, alert rules. Returns the snapshot (None if unreadable)."""
        offset = None
        try:
            snapshot = self.read()
            self.latest, self.last_error = snapshot, None
        except Exception as exc:  # noqa: BLE001 - the database may be down: keep the last reading and say so
            snapshot, self.last_error = None, type(exc).__name__
            _log.bind(action="refresh_failed").warning("monitoring could not read the database: {}", type(exc).__name__)
        if self.clock_offset is not None:
            try:
                offset = self.clock_offset()
            except Exception:  # noqa: BLE001 - the database's clock unreadable: the stages report the outage
                offset = None
        if self.metrics is not None:
            if snapshot is not None:
                self.metrics.snapshot_read(snapshot)
            if offset is not None:
                self.metrics.offset.set(offset)
        if self.book is not None:
            self._evaluate(snapshot, offset)
        return snapshot

    def _evaluate(self, snapshot: Snapshot | None, offset: float | None) -> None:
        from cancel_scanner.alerts.rules import RULES, Reading

        routine = frozenset(name for name, stage in self.stages.items() if stage.rejections_are_routine)
        reading = Reading(
            snapshot=snapshot,
            calls=self.calls,
            down=self.down(),
            clock_offset=offset,
            host=self.host,
            routine_stages=routine,
            reconcile_expected=self.reconcile_expected,
            pace_disagreement=getattr(self.runner, "pace_disagreement", None),
        )
        try:
            self.book.evaluate(reading)
        except Exception:  # noqa: BLE001 - a bug in a rule must not stop the gauges or the page
            _log.bind(action="alert_rules_failed").opt(exception=True).error("alert rules failed")
        if self.metrics is not None:
            self.metrics.alerts_firing(RULES, self.book.firing())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.once()
            except Exception:  # noqa: BLE001 - a bug here must not freeze the gauges for good: log it, read again next time
                _log.bind(action="watch_failed").opt(exception=True).error("monitoring reading failed")
            self._stop.wait(self.interval if self._seen_itself() else min(self.interval, FIRST_BEAT_POLL_SECONDS))

    def _seen_itself(self) -> bool:
        """Whether a reading has listed this daemon among the running ones. Until its first heartbeat
        has landed none does, and the page would say "not running" on the very daemon serving it: the
        first readings come FIRST_BEAT_POLL_SECONDS apart instead (FIRST_BEAT_POLLS of them at most,
        so a database that is down is not read faster for long)."""
        if self._first_polls_left <= 0:
            return True
        owner = getattr(self.runner, "owner", None)
        latest = self.latest
        if owner is None or (latest is not None and owner in latest.status.owners):
            self._first_polls_left = 0
            return True
        self._first_polls_left -= 1
        return False
