"""Outcomes to flag flips: which columns a row's outcome writes. Pure: no database, no clock.

The one mapping every stage shares (the contract's flag table): Done is ``1/1``, Failed ``1/0``
with its reason, Retry stays ``0/0`` with the next try and the attempt counted (or becomes
Failed when the retry policy gives up), Later stays ``0/0`` without spending an attempt, Blocked
touches nothing but the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cancel_scanner.engine.config import JobConfig
from cancel_scanner.engine.logs import EventLog
from cancel_scanner.engine.outcome import Blocked, Done, Failed, Later, Outcome, Retry, clip
from cancel_scanner.engine.retry import GiveUp, decide
from cancel_scanner.engine.stage import Stage


def flip_for(
    stage: Stage, job: JobConfig, outcome: Outcome, attempts_before: int, now: datetime
) -> tuple[Outcome, dict[str, Any]]:
    """The final outcome of a row and the columns its flag flip writes. Pure: no database, no clock."""
    flags = stage.flags
    attempts = flags.attempts.name
    if isinstance(outcome, Retry):
        decision = decide(outcome, attempts_before, now, job)
        if isinstance(decision, GiveUp):
            outcome = Failed(decision.code, decision.reason)
        else:
            return outcome, {
                attempts: decision.attempts,
                flags.next_attempt_at.name: decision.at,
                flags.last_error.name: outcome.describe(),
            }
    if isinstance(outcome, Done):
        return outcome, {
            flags.scanned.name: 1,
            flags.success.name: 1,
            attempts: 0,
            flags.next_attempt_at.name: None,
            flags.last_error.name: None,
            **stage.done_values(outcome, now),
        }
    if isinstance(outcome, Failed):
        return outcome, {
            flags.scanned.name: 1,
            flags.success.name: 0,
            flags.next_attempt_at.name: None,
            flags.last_error.name: outcome.describe(),
            **stage.failed_values(outcome, now),
        }
    if isinstance(outcome, Later):
        return outcome, {
            attempts: 0,
            flags.next_attempt_at.name: outcome.at,
            flags.last_error.name: clip(outcome.note) if outcome.note else None,
        }
    if isinstance(outcome, Blocked):
        # Untouched but for the reason, so a DBA sees why the row waits; no attempt spent.
        return outcome, {flags.last_error.name: outcome.describe()}
    raise TypeError(f"not an outcome: {outcome!r}")


def count_outcome(report, outcome: Outcome) -> None:
    report.claimed += 1
    if isinstance(outcome, Done):
        report.done += 1
    elif isinstance(outcome, Failed):
        report.failed += 1
    elif isinstance(outcome, Retry):
        report.retried += 1
    elif isinstance(outcome, Later):
        report.later += 1
    elif isinstance(outcome, Blocked):
        report.blocked_rows += 1


def log_outcome(stage: Stage, row_id: int, said: Outcome, final: Outcome, values: Mapping[str, Any]) -> None:
    log = EventLog(stage=stage.name, row_id=row_id)  # written when the batch's try commits
    if isinstance(final, Retry):
        log.bind(
            action="retry", attempt=values[stage.flags.attempts.name], at=values[stage.flags.next_attempt_at.name]
        ).warning("will retry: {}", final.describe())
    elif isinstance(final, Failed):
        # A rejected merchant request is business as usual; anything else needs a person.
        level = "INFO" if stage.rejections_are_routine and not isinstance(said, Retry) else "ERROR"
        log.bind(action="failed", code=final.code).log(level, "{}", final.describe())
