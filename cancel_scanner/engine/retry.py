"""The retry policy: a pure function of the error, the attempts so far and the job's settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cancel_scanner.engine.config import JobConfig
from cancel_scanner.engine.outcome import Retry, clip


@dataclass(frozen=True)
class RetryAt:
    at: datetime
    attempts: int


@dataclass(frozen=True)
class GiveUp:
    code: str
    reason: str
    attempts: int


def delay_for(attempt: int, delays: tuple[float, ...]) -> float:
    """Seconds to wait before try ``attempt + 1``; the last delay repeats."""
    return delays[min(max(attempt, 1), len(delays)) - 1]


def decide(error: Retry, attempts_before: int, now: datetime, job: JobConfig) -> RetryAt | GiveUp:
    attempts = attempts_before + 1
    cap = job.max_attempts if error.give_up_after is None else min(job.max_attempts, error.give_up_after)
    if attempts >= cap and not error.endless:
        code = error.give_up_code or error.code
        said = clip(f"{error.code}: {error.give_up_message}") if error.give_up_message else error.describe()
        return GiveUp(code, f"{said} (gave up after {attempts} attempts)", attempts)
    return RetryAt(now + timedelta(seconds=delay_for(attempts, job.retry_delays_seconds)), attempts)
