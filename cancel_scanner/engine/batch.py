"""What one batch of a stage did, and the one rule every driver follows from it.

A batch ends in exactly one of six results (``BatchResult``): it worked rows (``Worked``; ``full``
when it got all it asked for, so more are probably ready), found none ready (``Idle``), found no
call slot within its window (``Paced``), lost a race and changed nothing (``Lost``), rolled back
on a database blip (``Backoff``), or was stopped by its environment, which a person must fix
(``Blocked``). ``next_step`` turns a result into what to do next, and both drivers (the daemon's
stage loop and ``Runner.run_until_idle``) follow it, so they cannot disagree on what "paced" or
"lost" means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from sqlalchemy import Row

from cancel_scanner.engine.outcome import Outcome

PACED_WAIT_SECONDS = 0.05  # the pacer frees a slot within its window: look again this soon
MAX_PACED_SECONDS = 60.0  # ... but not for longer than this in a row: then something is wrong, say so
MAX_LOST_IN_A_ROW = 20  # races lost one after another before they count as a failure


@dataclass(frozen=True)
class Worked:
    full: bool = False


@dataclass(frozen=True)
class Idle:
    pass


@dataclass(frozen=True)
class Paced:
    pass


@dataclass(frozen=True)
class Lost:
    reason: str


@dataclass(frozen=True)
class Backoff:
    reason: str


@dataclass(frozen=True)
class Blocked:
    reason: str


BatchResult: TypeAlias = Worked | Idle | Paced | Lost | Backoff | Blocked


@dataclass
class BatchReport:
    """A batch's result and what happened to the rows it claimed."""

    stage: str
    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    later: int = 0
    skipped: int = 0
    blocked_rows: int = 0
    batch_size: int = 0
    result: BatchResult = field(default_factory=Idle)
    one_by_one: bool = False  # some rows failed alone (isolate): the rest of the batch was done without them
    row_blocked: str | None = None  # a row's outcome said the environment stops the stage (Blocked outcome)
    outcomes: dict[int, Outcome] = field(default_factory=dict, repr=False)

    # Read-only views of ``result``, for the monitoring and for people reading a report.
    @property
    def error(self) -> str | None:
        return self.result.reason if isinstance(self.result, Backoff) else None

    @property
    def lost(self) -> str | None:
        return self.result.reason if isinstance(self.result, Lost) else None

    @property
    def blocked(self) -> str | None:
        return self.result.reason if isinstance(self.result, Blocked) else None

    @property
    def paced(self) -> bool:
        return isinstance(self.result, Paced)

    @property
    def full(self) -> bool:
        return isinstance(self.result, Worked) and self.result.full

    @property
    def progressed(self) -> bool:
        return bool(self.done or self.failed or self.retried or self.later)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def counts(self) -> dict[str, int]:
        """What happened to the rows claimed, for the batch's log line."""
        return {k: getattr(self, k) for k in ("claimed", "done", "failed", "retried", "later", "skipped")}

    def add(self, part: BatchReport) -> None:
        """Count ``part``'s rows in this report (a part of the batch, or a batch of a longer run)."""
        for attr in ("claimed", "done", "failed", "retried", "later", "skipped", "blocked_rows"):
            setattr(self, attr, getattr(self, attr) + getattr(part, attr))
        self.outcomes.update(part.outcomes)
        self.row_blocked = self.row_blocked or part.row_blocked

    def clear_rows(self) -> None:
        """The batch rolled back whole: none of its rows is done."""
        self.claimed = self.done = self.failed = self.retried = self.later = self.skipped = self.blocked_rows = 0
        self.outcomes.clear()

    def settle(self) -> None:
        """The result of a batch that ran to its end: Blocked if a row said so, else Worked or Idle."""
        if self.row_blocked:
            self.result = Blocked(self.row_blocked)
        elif self.claimed:
            self.result = Worked(full=self.batch_size > 0 and self.claimed >= self.batch_size and not self.skipped)
        else:
            self.result = Idle()


@dataclass
class Hooks:
    """Test seams. Each is called inside the engine at the named moment; raising aborts the step."""

    after_lease: Callable[[str, list[int]], None] | None = None
    after_gateway_call: Callable[[str, Row, Any], None] | None = None
    before_commit: Callable[[str, list[int]], None] | None = None


@dataclass(frozen=True)
class Again:
    """Run the stage again, ``after`` seconds from now (0: at once)."""

    after: float = 0.0


@dataclass(frozen=True)
class Rest:
    """Nothing more now: the stage's next interval, or a wake from the stage that feeds it."""


@dataclass(frozen=True)
class Fail:
    """The stage failed: back off (the daemon) or stop (run --once). ``blocked``: a person must fix it."""

    reason: str
    blocked: bool = False


Step: TypeAlias = Again | Rest | Fail


@dataclass(frozen=True)
class Streak:
    """Results that repeat without progress, counted across batches: races lost, batches paced."""

    lost: int = 0
    paced: int = 0


def next_step(result: BatchResult, streak: Streak) -> tuple[Step, Streak]:
    """What to do after a batch that ended in ``result``, and the streak to carry to the next one. Pure."""
    match result:
        case Worked(full=True):
            return Again(), Streak()
        case Worked() | Idle():
            return Rest(), Streak()
        case Lost(reason=reason):
            lost = streak.lost + 1  # another daemon won these rows: nothing happened, look again
            if lost > MAX_LOST_IN_A_ROW:  # contention that does not clear: a failure like any other
                return Fail(f"lost {lost} races in a row: {reason}"), Streak()
            return Again(), Streak(lost=lost)
        case Paced():
            paced = streak.paced + 1
            if paced * PACED_WAIT_SECONDS > MAX_PACED_SECONDS:
                return Fail(f"found no free call slot for {MAX_PACED_SECONDS:.0f}s"), Streak()
            return Again(after=PACED_WAIT_SECONDS), Streak(paced=paced)
        case Backoff(reason=reason):
            return Fail(reason), Streak()
        case Blocked(reason=reason):
            return Fail(reason, blocked=True), Streak()
    raise TypeError(f"not a batch result: {result!r}")
