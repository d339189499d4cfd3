"""Client-side pacing so we never hit WeChat's per-merchant QPS limits.

Strict pacing rather than a token bucket: callers get slots exactly 1/qps
apart and an idle period banks no credit. A bucket would allow a burst of up
to `qps` calls at once after a pause, and WeChat counts per second window, so
a burst straddling a window edge could exceed the limit. Over a 429 on apply
is an UnknownOutcome (a retry and a query later), so pacing is cheaper.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class RateLimiter:
    """Thread-safe: each acquire() reserves the next free slot, then sleeps outside the lock until it."""

    def __init__(
        self,
        qps: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps is not None and qps <= 0:
            raise ValueError(f"qps must be positive or None (no limit): {qps!r}")
        self.qps = qps
        self._interval = 1.0 / qps if qps else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot: float | None = None

    def acquire(self) -> float:
        """Block until this caller may go; returns the slot time (on `clock`)."""
        if self.qps is None:
            return self._clock()
        with self._lock:
            now = self._clock()
            slot = now if self._next_slot is None else max(now, self._next_slot)
            self._next_slot = slot + self._interval
        # Sleeping outside the lock lets other threads reserve their later slots meanwhile.
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return slot

    def __repr__(self) -> str:
        return f"RateLimiter(qps={self.qps!r})"
