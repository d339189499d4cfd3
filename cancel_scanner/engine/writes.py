"""Outcomes written as flag flips, guarded, in as few statements as there are kinds of outcome.

Every flip is guarded by the value it expects (``scanned = 0``, and our lease for gateway stages);
if fewer rows match than were claimed the statement raises ``LostClaim`` and the batch rolls back
whole, so a stray second runner changes nothing. Rows that failed alone (a shop trigger, a bug) are
written one by one, each in a savepoint of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Row

from cancel_scanner.engine.batch import BatchReport
from cancel_scanner.engine.claim import Claimer
from cancel_scanner.engine.config import JobConfig
from cancel_scanner.engine.errors import is_environment_db_error, is_transient_db_error, shop_refusal
from cancel_scanner.engine.facts import record_fact
from cancel_scanner.engine.flips import count_outcome, flip_for, log_outcome
from cancel_scanner.engine.isolate import fault_outcome, try_in_savepoint
from cancel_scanner.engine.outcome import OUTCOME_UNKNOWN, Blocked, Outcome
from cancel_scanner.engine.sql import update_rows
from cancel_scanner.engine.stage import Stage


class LostClaim(Exception):
    """Fewer rows matched a guarded flag flip than were claimed: someone else got there first."""


def is_row_fault(exc: BaseException) -> bool:
    """A row, not the database, failed: isolate it instead of rolling back and backing off the batch."""
    return not (is_transient_db_error(exc) or is_environment_db_error(exc) or isinstance(exc, LostClaim))


@dataclass(frozen=True)
class Write:
    """What every flag write of one batch shares: its transaction, stage, job settings and clock;
    ``owner``: the rows are leased to it (gateway stages), and released."""

    conn: Connection
    stage: Stage
    job: JobConfig
    now: datetime
    owner: str | None = None


class FlagWriter:
    def __init__(self, claimer: Claimer):
        self.claimer = claimer

    def outcomes(self, w: Write, rows: Sequence[Row], outcomes: Mapping[int, Outcome], report: BatchReport) -> None:
        """Each row's outcome as its flag flip; rows leased to ``w.owner`` are released."""
        stage, owner = w.stage, w.owner
        missing = {r.id for r in rows} - set(outcomes)
        if missing:
            raise RuntimeError(f"stage {stage.name} returned no outcome for rows {sorted(missing)[:10]}")
        flags = stage.flags
        release = (
            {flags.lease_owner.name: None, flags.lease_until.name: None}
            if owner and flags.lease_owner is not None and flags.lease_until is not None
            else {}
        )
        groups: dict[frozenset, dict[int, dict[str, Any]]] = defaultdict(dict)
        for row in rows:
            outcome, values = flip_for(stage, w.job, outcomes[row.id], getattr(row, flags.attempts.name), w.now)
            count_outcome(report, outcome)
            report.outcomes[row.id] = outcome
            log_outcome(stage, row.id, outcomes[row.id], outcome, values)
            if isinstance(outcome, Blocked):
                report.row_blocked = report.row_blocked or outcome.describe()
            values.update(release)
            groups[frozenset(values)][row.id] = values

        # One UPDATE per kind of outcome, however many rows and whatever their values:
        # a column whose value differs between rows is written with CASE id WHEN ... END.
        guard = [flags.scanned == 0] + ([flags.lease_owner == owner] if release else [])
        for members in groups.values():
            matched = update_rows(w.conn, flags.table, members, *guard)
            if matched != len(members):
                raise LostClaim(f"{stage.name}: {len(members)} rows claimed, {matched} still ours")

    def faults(self, w: Write, faults: list[tuple[Row, BaseException, Any]], report: BatchReport) -> None:
        """Rows that failed alone: each its attempt counted and its reason, in a savepoint of its own (a
        shop rule may refuse even that); for a gateway stage, first what the channel did for it."""
        conn, stage = w.conn, w.stage
        report.one_by_one = True  # the rest of the batch was done without them
        for row, exc, result in faults:
            fact = stage.channel_fact(row, result) if result is not None else None
            # A stage whose 1/0 says "the channel refused" (submit_refund): after a call, whatever its
            # answer, a row that gives up says "unknown, check by hand", never "refused".
            guarded = stage.fact_stays_pending
            outcome = fault_outcome(
                stage.name,
                row.id,
                exc,
                fact=fact.detail if fact else None,
                bugs_stay_pending=stage.bugs_stay_pending,
                fact_stays_pending=guarded,
                give_up_code=OUTCOME_UNKNOWN if guarded and result is not None else None,
            )
            if fact is not None:
                kept = try_in_savepoint(
                    conn, partial(record_fact, conn, stage.name, row.id, fact, outcome.describe(), w.now)
                )
                if kept is not None and not is_row_fault(kept):
                    raise kept  # the database's failure (a grant missing on channel_fact, a lock wait): the batch's
                if kept is not None:
                    logger.opt(exception=kept).bind(
                        stage=stage.name, row_id=row.id, action="fact_lost", fact=fact.fact
                    ).error("{}: could not be kept in channel_fact either", fact.detail)
            self.alone(w, [row], {row.id: outcome}, report)

    def alone(self, w: Write, rows: Sequence[Row], outcomes: Mapping[int, Outcome], report: BatchReport) -> None:
        """Each row's flags in a savepoint of its own: a row whose own flags the database refuses (a
        shop rule on the whole row) is left out of claims for a while, and the others are written."""
        stage = w.stage
        for row in rows:
            part = BatchReport(stage=stage.name)
            one = {row.id: outcomes[row.id]}
            refused = try_in_savepoint(w.conn, partial(self.outcomes, w, [row], one, part))
            if refused is None:
                report.add(part)
                continue
            if not is_row_fault(refused):
                raise refused
            seconds = float(w.job.retry_delays_seconds[-1])
            self.claimer.quarantine(stage.name, row.id, seconds)
            logger.bind(stage=stage.name, row_id=row.id, action="row_unwritable").error(
                "its flags cannot be written ({}): left alone for {:g}s",
                shop_refusal(refused) or type(refused).__name__,
                seconds,
            )
