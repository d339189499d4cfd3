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

Sharing WeChat's limits: an entry names the merchant whose per-merchant QPS its
process paces against (``pace_group``, the mchid; NULL when it calls no paced
endpoint). Each reap reads every entry anyway, so it also counts the live ones of
our group (``sharers``) and tells ``on_share`` (the gateway's PaceShare): N daemons of one
merchant each pace at an N-th of the configured QPS (less a little: WeChatPayGateway.share_pace).
A process that has just registered is told it is new (``fresh``), and holds its calls until the
others have read its entry.

The same read gives each process its slice of the rows: of the N live entries, sorted by owner,
ours is number k, and claims take the k-th of every N blocks of ids first (then any; engine/claim.py),
so N claimers rarely reach for the same rows.

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
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta

from loguru import logger
from sqlalchemy import Column, Engine, delete, func, insert, select, update

from cancel_scanner.engine.config import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_TAKEOVER_SECONDS
from cancel_scanner.engine.sql import locked
from cancel_scanner.models import scanner_process

# Covers the heartbeat's own round trip and a survivor's read of the clock.
HEARTBEAT_MARGIN_SECONDS = 1.5

_log = logger.bind(stage="registry")
p = scanner_process.c


def encode_limits(limits: Mapping[str, float]) -> str | None:
    """``{"apply": 150.0, "query": 300.0}`` as the entry's ``pace_limits``: ``apply=150;query=300``."""
    return ";".join(f"{endpoint}={qps:g}" for endpoint, qps in sorted(limits.items())) or None


def decode_limits(text: str | None) -> dict[str, float]:
    """An entry's ``pace_limits``; what cannot be read is left out (an older process publishes none)."""
    limits: dict[str, float] = {}
    for part in (text or "").split(";"):
        endpoint, _, qps = part.partition("=")
        try:
            value = float(qps)
        except ValueError:
            continue
        if endpoint and value > 0:
            limits[endpoint] = value
    return limits


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's
        return True
    return True


class Registry:
    """This process's entry in the registry, its heartbeat, and the reaper of dead entries."""

    def __init__(
        self,
        db: Engine,
        clock: Callable[[], datetime],
        lease_columns: Iterable[tuple[Column, Column]],
        *,
        takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        owner: str | None = None,
        pace_group: str | None = None,
        pace_limits: Mapping[str, float] | None = None,
        on_share: Callable[[int, bool, list[tuple[str, dict[str, float]]]], None] | None = None,
    ):
        if heartbeat_seconds >= takeover_seconds - HEARTBEAT_MARGIN_SECONDS:
            raise ValueError("heartbeat_seconds must be well below takeover_seconds")
        self.db = db
        self.clock = clock
        self.lease_columns = tuple(lease_columns)  # (lease_owner, lease_until) per leased table
        self.takeover_seconds = takeover_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.monotonic = monotonic
        # (owner, monotonic start of its last successful beat), replaced as one value so that a
        # reader never pairs a new owner's heartbeat with an old owner's leases.
        self._state: tuple[str, float | None] = (owner or new_owner_id(), None)
        self._registered = False
        self.last_error: str | None = None  # why the last heartbeat failed, None once one succeeds
        # What each beat publishes in the entry's ``report`` (the daemon's Progress.report), read by `status`.
        self.report: Callable[[], str | None] | None = None
        self.pace_group = pace_group
        self.pace_limits = dict(pace_limits or {})  # the QPS per endpoint we were configured with: published
        self.sharers = 1  # live entries of our pace group, us included, as of the last reap
        # (our rank, how many live entries) as of the last reap: claimers take the rows of their own
        # slice (id mod N = rank) first. (0, 1) alone or before the first reap.
        self.slice: tuple[int, int] = (0, 1)
        # Told (sharers, fresh, peers) after every reap while we pace: fresh once, after (re)registering;
        # peers: the other live processes of our group, each ("host:pid", the limits it published).
        self.on_share = on_share
        self._fresh = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def owner(self) -> str:
        return self._state[0]

    # --- the deadline every gateway call obeys ---------------------------------------------------

    def safe_until(self, owner: str | None = None) -> float:
        """Monotonic instant until which no survivor can have declared ``owner`` (default: us now) dead."""
        current, started = self._state
        if started is None or (owner is not None and owner != current):
            return float("-inf")
        return started + self.takeover_seconds - HEARTBEAT_MARGIN_SECONDS

    # --- heartbeat ----------------------------------------------------------------------------------

    def beat(self) -> None:
        """Register or refresh this process's entry. A missing entry means we were declared dead."""
        with self._lock:
            try:
                self._beat()
                self.last_error = None
            except Exception as exc:
                self.last_error = f"heartbeat failed: {type(exc).__name__}"
                if not self._registered:
                    # The INSERT may have committed although we saw an error: a fresh id never collides.
                    self._state = (new_owner_id(), None)
                raise

    def _beat(self) -> None:
        started = self.monotonic()
        now = self.clock()
        owner = self.owner
        report = self.report() if self.report is not None else None
        with self.db.begin() as conn:
            if self._registered:
                found = conn.execute(
                    update(scanner_process).where(p.owner == owner).values(heartbeat_at=now, report=report)
                ).rowcount
                if not found:
                    owner = self._lost(owner)
            if not self._registered:
                conn.execute(
                    insert(scanner_process).values(
                        owner=owner,
                        hostname=socket.gethostname()[:64],
                        pid=os.getpid(),
                        started_at=now,
                        heartbeat_at=now,
                        report=report,
                        pace_group=self.pace_group,
                        pace_limits=encode_limits(self.pace_limits),
                    )
                )
                self._fresh = True
        self._registered = True
        self._state = (owner, started)

    def _lost(self, old: str) -> str:
        new = new_owner_id()
        self._registered = False
        self._state = (new, None)
        _log.bind(action="declared_dead", old_owner=old, owner=new).error(
            "this process was silent for more than {:.0f}s (paused, or cut off from the database) and other"
            " processes took over its leases; the work it still holds is dropped, it goes on as {}",
            self.takeover_seconds,
            new,
        )
        return new

    def reap(self) -> list[str]:
        """Release the leases of processes silent for takeover_seconds; returns the owners reaped.

        SKIP LOCKED throughout: a frozen process may sit in a transaction holding some of its rows;
        those wait for it, and the rest of its work (and every other dead process's) is taken over
        now. Its entry goes only when none of its leases is left, so the next pass tries again.
        """
        cutoff = self.clock() - timedelta(seconds=self.takeover_seconds)
        me = self.owner
        with self.db.connect() as conn:
            # Every entry (one per running process): the dead, and the live ones sharing our pace.
            entries = conn.execute(
                select(p.owner, p.heartbeat_at, p.pace_group, p.pace_limits, p.hostname, p.pid).order_by(p.id)
            ).all()
        dead = [e.owner for e in entries if e.heartbeat_at < cutoff and e.owner != me]
        # Sharing and slices count the live entries, less those of processes of this host that no
        # longer exist (a daemon killed and started again): they call nothing, though only
        # takeover_seconds of silence makes them dead for the reaper.
        host = socket.gethostname()[:64]
        mine = os.getpid()  # another owner under our pid is a former life of ours (an INSERT whose answer we lost)
        entries = [e for e in entries if e.owner == me or e.hostname != host or (e.pid != mine and _pid_exists(e.pid))]
        live = sorted(e.owner for e in entries if e.heartbeat_at >= cutoff or e.owner == me)
        self.slice = (live.index(me), len(live)) if me in live else (0, 1)
        if self.pace_group is not None:
            peers = [
                (f"{e.hostname}:{e.pid}", decode_limits(e.pace_limits))
                for e in entries
                if e.owner != me and e.heartbeat_at >= cutoff and e.pace_group == self.pace_group
            ]
            self.sharers, fresh, self._fresh = 1 + len(peers), self._fresh, False
            if self.on_share is not None:
                self.on_share(self.sharers, fresh, peers)
        reaped = []
        for owner in dead:
            released, left = self._reap_one(owner, cutoff)
            if left is not None:
                reaped.append(owner)
                _log.bind(action="reaped", dead_owner=owner, leases_released=released, leases_locked=left).warning(
                    "took over from a process silent for {:.0f}s: {} lease(s) released", self.takeover_seconds, released
                )
        return reaped

    def _reap_one(self, owner: str, cutoff: datetime) -> tuple[int, int | None]:
        """(leases released, leases still locked by it), or (0, None) if it beat meanwhile."""
        with self.db.begin() as conn:
            entry = conn.execute(
                locked(conn, select(p.id).where(p.owner == owner, p.heartbeat_at < cutoff), skip_locked=True)
            ).first()
            if entry is None:
                return 0, None  # it beat just now (or another survivor is reaping it)
            released = left = 0
            for owner_col, until_col in self.lease_columns:
                table = owner_col.table
                held = select(table.c.id).where(owner_col == owner)
                ids = list(conn.execute(locked(conn, held, skip_locked=True)).scalars())
                if ids:
                    released += (
                        conn.execute(
                            update(table)
                            .where(table.c.id.in_(ids), owner_col == owner)
                            .values({owner_col: None, until_col: None})
                        ).rowcount
                        or 0
                    )
                left += conn.execute(select(func.count()).select_from(table).where(owner_col == owner)).scalar_one()
            if not left:
                conn.execute(delete(scanner_process).where(p.id == entry.id))
        return released, left

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
            self._state = (self.owner, None)

    # --- the background heartbeat of a daemon -------------------------------------------------

    def start(
        self, on_reaped: Callable[[list[str]], None] | None = None, on_tick: Callable[[], None] | None = None
    ) -> None:
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
                except Exception as exc:  # noqa: BLE001
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
