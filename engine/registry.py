"""The process registry: who is alive, by heartbeats in the database, and fast takeover from the dead.

Every process that leases rows registers itself (``cancel_scanner_process``) and
beats at least every ``heartbeat_seconds``, stamping the database's time. A
process silent for ``takeover_seconds`` is dead: any survivor deletes its entry
and releases its leases in the same transaction, so its work is taken over in
seconds instead of after ``lease_seconds``.

Why that is safe with a paused (not dead) process: a process sends a gateway
call only while ``safe_until()`` is in the future, that is within
``takeover_seconds - HEARTBEAT_MARGIN_SECONDS`` of the moment it started its last
successful heartbeat, and every call is cut off at that deadline. Survivors
declare it dead only ``takeover_seconds`` after that heartbeat's database time,
which is later. So by the time its leases are released, none of its calls can
still be in flight. When it resumes, its heartbeat finds its entry gone: it
takes a new owner id, and every answer it still holds under the old id fails the
ownership check and is dropped.

Stale entries are locked, deleted and their leases released in one transaction:
a process whose heartbeat races the reaper either commits its beat first (and is
not stale any more) or waits for the reaper and then finds its entry gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Callable, Iterable

from loguru import logger
from sqlalchemy import Engine, Table, delete, insert, select, update

from engine.sql import locked
from models import scanner_process

DEFAULT_TAKEOVER_SECONDS = 10.0
DEFAULT_HEARTBEAT_SECONDS = 1.0
# Covers the heartbeat's own round trip and a survivor's read of the clock.
HEARTBEAT_MARGIN_SECONDS = 1.5

_log = logger.bind(stage="registry")
p = scanner_process.c


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Registry:
    """This process's entry in the registry, its heartbeat, and the reaper of dead entries."""

    def __init__(
        self,
        db: Engine,
        clock: Callable[[], datetime],
        lease_tables: Iterable[Table],
        *,
        takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        owner: str | None = None,
    ):
        if heartbeat_seconds >= takeover_seconds - HEARTBEAT_MARGIN_SECONDS:
            raise ValueError("heartbeat_seconds must be well below takeover_seconds")
        self.db = db
        self.clock = clock
        self.lease_tables = tuple(lease_tables)
        self.takeover_seconds = takeover_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.monotonic = monotonic
        self.owner = owner or new_owner_id()
        self._beat_started: float | None = None  # monotonic start of the last successful beat
        self._registered = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- the deadline every gateway call obeys ---------------------------------------------------

    def safe_until(self) -> float:
        """Monotonic instant until which no survivor can have declared this process dead."""
        started = self._beat_started
        if started is None:
            return float("-inf")
        return started + self.takeover_seconds - HEARTBEAT_MARGIN_SECONDS

    def beat_due(self) -> bool:
        started = self._beat_started
        return started is None or self.monotonic() - started >= self.heartbeat_seconds

    # --- heartbeat ----------------------------------------------------------------------------------

    def beat(self) -> None:
        """Register or refresh this process's entry. A missing entry means we were declared dead."""
        with self._lock:
            started = self.monotonic()
            now = self.clock()
            with self.db.begin() as conn:
                if self._registered:
                    found = conn.execute(
                        update(scanner_process).where(p.owner == self.owner).values(heartbeat_at=now)
                    ).rowcount
                    if not found:
                        self._lost(started)
                if not self._registered:
                    conn.execute(
                        insert(scanner_process).values(
                            owner=self.owner,
                            hostname=socket.gethostname()[:64],
                            pid=os.getpid(),
                            started_at=now,
                            heartbeat_at=now,
                        )
                    )
            self._registered = True
            self._beat_started = started

    def _lost(self, started: float) -> None:
        old = self.owner
        self.owner = new_owner_id()
        self._registered = False
        self._beat_started = None
        _log.bind(action="declared_dead", old_owner=old, owner=self.owner).error(
            "this process was silent for more than {:.0f}s (paused, or cut off from the database) and other"
            " processes took over its leases; the work it still holds is dropped, it goes on as {}",
            self.takeover_seconds,
            self.owner,
        )

    def reap(self) -> list[str]:
        """Delete the entries of processes silent for takeover_seconds and release their leases."""
        now = self.clock()
        cutoff = now - timedelta(seconds=self.takeover_seconds)
        with self.db.begin() as conn:
            dead = list(
                conn.execute(
                    locked(conn, select(p.owner).where(p.heartbeat_at < cutoff, p.owner != self.owner).order_by(p.id))
                ).scalars()
            )
            if not dead:
                return []
            released = 0
            for table in self.lease_tables:
                released += conn.execute(
                    update(table).where(table.c.lease_owner.in_(dead)).values(lease_owner=None, lease_until=None)
                ).rowcount or 0
            conn.execute(delete(scanner_process).where(p.owner.in_(dead)))
        _log.bind(action="reaped", processes=len(dead), leases_released=released).warning(
            "took over from {} silent process(es): {} lease(s) released ({})", len(dead), released, ", ".join(dead)
        )
        return dead

    def tick(self) -> list[str]:
        """One heartbeat, then reap; returns the owners reaped."""
        self.beat()
        return self.reap()

    def deregister(self) -> None:
        """Clean stop: remove our entry (our leases were released by the runner)."""
        with self._lock:
            if not self._registered:
                return
            with self.db.begin() as conn:
                conn.execute(delete(scanner_process).where(p.owner == self.owner))
            self._registered = False
            self._beat_started = None

    # --- the background heartbeat of a daemon -------------------------------------------------

    def start(self, on_reaped: Callable[[list[str]], None] | None = None, on_tick: Callable[[], None] | None = None) -> None:
        """Beat and reap every heartbeat_seconds in a thread of its own, until stop()."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            failures = 0
            while not self._stop.is_set():
                try:
                    reaped = self.tick()
                    if failures:
                        _log.bind(action="heartbeat_recovered").info("heartbeat recovered")
                    failures = 0
                    if reaped and on_reaped:
                        on_reaped(reaped)
                    if on_tick:
                        on_tick()
                except Exception as exc:
                    # While the database is away no heartbeat lands: safe_until() runs out and the
                    # gateway stages send nothing, which is exactly what must happen.
                    failures += 1
                    if failures == 1:
                        # INFO: the stages report the database being away, once per backoff step.
                        _log.bind(action="heartbeat_failed").info(
                            "heartbeat failed ({}); gateway calls pause until it succeeds", type(exc).__name__
                        )
                self._stop.wait(self.heartbeat_seconds)

        self._thread = threading.Thread(target=loop, name="cs-heartbeat", daemon=True)
        self._thread.start()

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
