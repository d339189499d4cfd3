"""What a stage says about each row of its batch. The engine turns these into flag flips."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

MAX_ERROR_LEN = 255
# The code a row that may have reached the gateway ends with when it gives up: "check by hand",
# never a rejection.
OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"


@dataclass(frozen=True)
class Done:
    """The stage's work for this row is done: flip ``scanned=1, success=1``."""

    detail: str | None = None


@dataclass(frozen=True)
class Coded:
    """A stable code (for machines and DBAs) and a message (for a person), described in one short line."""

    code: str
    message: str

    def describe(self) -> str:
        return clip(f"{self.code}: {self.message}")


@dataclass(frozen=True)
class Failed(Coded):
    """A permanent failure: flip ``scanned=1, success=0`` with the reason; an operator must look."""


@dataclass(frozen=True)
class Retry(Coded):
    """A transient failure: the row stays pending; the retry policy picks when, or gives up."""

    give_up_after: int | None = None  # a tighter cap than the job's max_attempts (e.g. a 404 right after payment)
    # The code a row ends with when the policy gives up, if not ``code``: a refund that may have
    # reached WeChat ends OUTCOME_UNKNOWN ("check by hand"), never as a rejection.
    give_up_code: str | None = None
    # Never give up: past the attempts cap the row stays pending, tried again at the last delay. For a
    # row that must not end 1/0 (a refund WeChat accepted, a merchant's request hit by a bug).
    endless: bool = False
    # What a row that gives up says, if not this retry's own words ("... it is tried again").
    give_up_message: str | None = None


@dataclass(frozen=True)
class Later:
    """Not a failure: nothing to do yet, look again at ``at`` (a refund still PROCESSING)."""

    at: datetime
    note: str | None = None


@dataclass(frozen=True)
class Blocked:
    """Not this row's fault: the environment stops the stage (credentials refused, clock, privileges).

    The row stays as it is, spends no attempt, and the stage backs off and alerts until a person fixes it.
    """

    code: str
    message: str

    def describe(self) -> str:
        return clip(f"{self.code}: {self.message}")


Outcome = Done | Failed | Retry | Later | Blocked


def clip(text: str, limit: int = MAX_ERROR_LEN) -> str:
    """Fit a message into a VARCHAR(255) column, counting characters as MySQL does."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Contended(Exception):
    """Raised by a stage's ``finish``: rows whose shared row (a goods row) someone else holds.

    The engine rolls the batch back to before ``process``, answers these rows Later (no attempt
    spent) and runs the rest again; the rest of the batch never waits for them.
    """

    def __init__(self, row_ids: set[int], note: str, retry_in_seconds: float = 1.0):
        super().__init__(note)
        self.row_ids = set(row_ids)
        self.note = note
        self.retry_in_seconds = retry_in_seconds
