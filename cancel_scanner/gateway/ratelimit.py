"""Client-side pacing so we never hit WeChat's per-merchant QPS limits.

Strict pacing rather than a token bucket: callers get slots exactly 1/qps
apart and an idle period banks no credit. A bucket would allow a burst of up
to `qps` calls at once after a pause, and WeChat counts per second window, so
a burst straddling a window edge could exceed the limit. Over a 429 on apply
is an UnknownOutcome (a retry and a query later), so pacing is cheaper.

A caller with a deadline books a slot only if it is early enough
(`try_acquire`): a slot booked by a call that then gives up is a slot every
later caller waits behind for nothing.

Slots are booked ahead, so callers that wake late (a busy machine, a pause) would start together:
each start is therefore also checked against the starts of the last second (``WINDOW_SECONDS``),
and no more than floor(qps) + 1 start in any such window, which is what strict pacing lands in
one of WeChat's one-second windows at most. A late caller waits for the window instead of bursting.

The pace can change while running (`set_qps`: N processes share one
merchant's limit, and N changes) and can be held (`hold_until`: no slot
before an instant, while the other processes learn of a newcomer).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

# Slots are sums of float intervals; without a little slack, a slot that lands
# exactly on a horizon could be counted out by rounding.
_EPSILON = 1e-9
WINDOW_SECONDS = 1.0  # WeChat counts a merchant's calls per second


def window_cap(qps: float | None) -> int | None:
    """Starts allowed in any one-second window at ``qps``: what strict pacing lands there at most."""
    return None if qps is None else math.floor(qps + _EPSILON) + 1


class RateLimiter:
    """Thread-safe: each caller reserves the next free slot under the lock, then sleeps outside it until the slot."""

    def __init__(
        self,
        qps: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if qps is not None and qps <= 0:
            raise ValueError(f"qps must be positive or None (no limit): {qps!r}")
        self.qps = qps
        self._interval = 1.0 / qps if qps else 0.0
        self._clock = clock
        # A timed Event wait rather than time.sleep: it sleeps on the monotonic clock the same way,
        # and keeps working under libfaketime (whose clock_nanosleep wrapper answers EINVAL when only
        # the wall clock is shifted), which the clock-drift tests run the daemon under.
        self._sleep = sleep or threading.Event().wait
        self._lock = threading.Lock()
        self._next_slot: float | None = None
        self._not_before = -math.inf
        self._starts: deque[float] = deque()  # the start times of the last WINDOW_SECONDS

    def set_qps(self, qps: float | None) -> None:
        """Pace at `qps` from the next free slot on (slots already booked keep their time)."""
        if qps is not None and qps <= 0:
            raise ValueError(f"qps must be positive or None (no limit): {qps!r}")
        with self._lock:
            self.qps = qps
            self._interval = 1.0 / qps if qps else 0.0

    def hold_until(self, instant: float) -> None:
        """No slot earlier than `instant` (on `clock`); -inf lifts the hold."""
        with self._lock:
            self._not_before = instant

    def acquire(self) -> float:
        """Block until this caller may go; returns the slot time (on `clock`)."""
        slot = self.try_acquire(math.inf)
        assert slot is not None
        return slot

    def held_for(self) -> float:
        """Seconds until the hold ends (0 when there is none)."""
        with self._lock:
            return max(0.0, self._not_before - self._clock())

    def try_acquire(self, latest_start: float) -> float | None:
        """Book the next free slot and sleep until it, but only if it is not later than `latest_start`.

        Returns the slot time (on `clock`), or None, having booked nothing and
        slept not at all, when the next free slot is later than `latest_start`.
        """
        with self._lock:
            now = self._clock()
            slot = self._free_slot(now)
            if slot > latest_start:
                return None
            if self.qps is not None:
                self._next_slot = slot + self._interval
        # Sleeping outside the lock lets other threads reserve their later slots meanwhile.
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        self._start_within_window(slot)
        return slot

    def _start_within_window(self, slot: float) -> None:
        """Record this start; a caller that woke after its slot (and may start together with others that
        did) first waits while the last second already holds the window's cap of starts."""
        while True:
            with self._lock:
                cap = window_cap(self.qps)
                now = self._clock()
                while self._starts and self._starts[0] <= now - WINDOW_SECONDS:
                    self._starts.popleft()
                if cap is None:
                    return
                if now <= slot + _EPSILON or len(self._starts) < cap:  # on time: strict pacing keeps the cap
                    self._starts.append(now)
                    return
                wait = self._starts[0] + WINDOW_SECONDS - now
            self._sleep(max(wait, _EPSILON))

    def calls_within(self, seconds: float) -> int | None:
        """How many calls could still start within `seconds` from now, after the slots already booked.

        None when unpaced (no limit). Books nothing: another thread may take
        those slots first.
        """
        if self.qps is None:
            return None
        with self._lock:
            now = self._clock()
            first = self._free_slot(now)
        horizon = now + seconds
        if first > horizon + _EPSILON:
            return 0
        return int((horizon - first) / self._interval + _EPSILON) + 1

    def _free_slot(self, now: float) -> float:
        # The caller holds the lock.
        return max(now, self._not_before) if self._next_slot is None else max(now, self._not_before, self._next_slot)

    def __repr__(self) -> str:
        return f"RateLimiter(qps={self.qps!r})"
