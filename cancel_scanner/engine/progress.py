"""What this process has done and how its stages stand, kept in memory and published with its heartbeat.

The daemon records every batch (rows done, failed, retried, later) and every stage going down
(backing off) and up again. The heartbeat writes the compact summary into this process's
registry entry (``cancel_scanner_process.report``), so that `status` in another process can say
which stages are down, since when and why, and how many rows the running daemons finished,
without counting finished rows. Nothing in it identifies an order or a refund, and reasons are
the engine's own descriptions (error classes and codes), never a value from a row.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

REPORT_MAX_CHARS = 4000  # cancel_scanner_process.report is VARCHAR(4000)
REASON_MAX_CHARS = 160
_OUTCOMES = ("done", "failed", "retry", "later")


@dataclass
class StageProgress:
    up: bool = True
    down_since: float | None = None  # wall clock (epoch seconds) of the first failure of this spell
    reason: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OUTCOMES, 0))


def describe_reason(error: Any) -> str:
    """A short, secret-free account of why a stage backs off."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, str):
        text = reason
    elif isinstance(error, str):
        text = error
    else:
        text = type(error).__name__
    text = " ".join(text.split())
    return text[:REASON_MAX_CHARS]


class Progress:
    """Thread-safe: batches finish on the scheduler's threads, the heartbeat reads on its own."""

    def __init__(self, stages: Iterable[str], wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.started_at = wall()
        self._lock = threading.Lock()
        self._stages = {name: StageProgress() for name in stages}

    def batch_done(self, report: Any) -> None:
        with self._lock:
            state = self._stages.get(report.stage)
            if state is None:
                return
            for outcome, n in zip(_OUTCOMES, (report.done, report.failed, report.retried, report.later)):
                state.counts[outcome] += n

    def stage_down(self, name: str, error: Any) -> None:
        with self._lock:
            state = self._stages[name]
            if state.up:
                state.up, state.down_since = False, self.wall()
            state.reason = describe_reason(error)

    def stage_up(self, name: str) -> None:
        with self._lock:
            state = self._stages[name]
            state.up, state.down_since, state.reason = True, None, None

    def down(self) -> dict[str, tuple[float, str | None]]:
        """Stages backing off now: name -> (seconds down, why)."""
        now = self.wall()
        with self._lock:
            return {
                n: (now - s.down_since, s.reason)
                for n, s in self._stages.items()
                if not s.up and s.down_since is not None
            }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                n: {"up": s.up, "down_since": s.down_since, "reason": s.reason, **s.counts}
                for n, s in self._stages.items()
            }

    def report(self) -> str:
        """The registry entry's ``report``: {"v": 1, "started_at": t, "at": t, "stages": {name: [up, down_since, reason, done,
        failed, retry, later]}}, compact JSON that always fits the column (reasons are dropped first)."""
        stages = self.snapshot()
        packed = {
            n: [int(s["up"]), s["down_since"], s["reason"], *(s[o] for o in _OUTCOMES)] for n, s in stages.items()
        }
        head = {"v": 1, "started_at": self.started_at, "at": self.wall()}
        text = json.dumps({**head, "stages": packed}, separators=(",", ":"), ensure_ascii=False)
        if len(text) > REPORT_MAX_CHARS:
            for row in packed.values():
                row[2] = None
            text = json.dumps({**head, "stages": packed}, separators=(",", ":"), ensure_ascii=False)
        return text


def read_report(text: str | None) -> dict[str, dict[str, Any]]:
    """The stages of a registry entry's ``report`` (empty when absent or unreadable: an older daemon).

    Each stage's ``down_for`` is how long it had been down when the report was written, by the
    writer's own clock alone (its ``at`` minus its ``down_since``): a reader on another host with
    another clock adds only the age of the heartbeat, which the database's clock measures."""
    if not text:
        return {}
    try:
        data = json.loads(text)
        stages, at = data["stages"], float(data["at"])
        out = {}
        for name, row in stages.items():
            up, since, reason, *counts = row
            down_for = max(0.0, at - float(since)) if since is not None and not up else None
            out[str(name)] = {
                "up": bool(up),
                "down_since": since,
                "down_for": down_for,
                "reason": reason,
                **dict(zip(_OUTCOMES, map(int, counts))),
            }
        return out
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
