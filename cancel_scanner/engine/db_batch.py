"""A database stage's batch: claim, process, flip the flags, finish, commit, all in one transaction.

Every write of the batch runs in a savepoint: when a row is at fault (a shop trigger's SIGNAL, a
constraint, a bug) ``isolate`` finds it by halves and the good rows commit with their claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, Row

from cancel_scanner.engine.batch import BatchReport, Hooks
from cancel_scanner.engine.claim import Claimer
from cancel_scanner.engine.config import JobConfig
from cancel_scanner.engine.isolate import isolate, undo
from cancel_scanner.engine.logs import held_until_commit, release
from cancel_scanner.engine.outcome import Contended, Later, Outcome
from cancel_scanner.engine.stage import DbStage
from cancel_scanner.engine.writes import FlagWriter, LostClaim, Write, is_row_fault

MAX_CONTENTION_ROUNDS = 4  # a batch re-done without newly contended rows at most this often


class DatabaseBatch:
    lanes = 1  # one batch at a time: a second would only wait for the first one's locks

    def __init__(self, db: Engine, stage: DbStage, claimer: Claimer, writer: FlagWriter, hooks: Hooks):
        self.db = db
        self.stage = stage
        self.claimer = claimer
        self.writer = writer
        self.hooks = hooks

    def run(self, job: JobConfig, now: datetime, report: BatchReport) -> None:
        stage = self.stage
        with self.db.begin() as conn:
            rows = self.claimer.claim(conn, stage, now, job.batch_size, block=job.batch_size)
            if not rows:
                return
            # _process undoes its own writes when it raises (the savepoint its contended rows need).
            done = isolate(conn, rows, lambda part: self._processed(conn, job, part, now), is_row_fault, atomic=True)
            for part in done.results:
                report.add(part)
            if done.faults:
                self.writer.faults(Write(conn, stage, job, now), [(row, exc, None) for row, exc in done.faults], report)
            if self.hooks.before_commit:
                self.hooks.before_commit(stage.name, [r.id for r in rows])

    def _processed(self, conn: Connection, job: JobConfig, rows: list[Row], now: datetime) -> BatchReport:
        part = BatchReport(stage=self.stage.name)
        self._process(conn, job, rows, now, part)
        return part

    def _process(
        self, conn: Connection, job: JobConfig, rows: Sequence[Row], now: datetime, report: BatchReport
    ) -> None:
        """process, flip the flags, finish; rows that finish finds contended go round again as Later.

        ``finish`` takes the shop's rows (goods) last, so they are locked only from there to the
        commit. When some are held by someone else, a savepoint takes the batch back to before
        ``process``: those rows are answered Later and the rest is done again, without them.
        """
        # Two rounds in practice: InnoDB keeps the row locks a rolled-back savepoint took, so the
        # second round's goods are all ours already. More would mean a stage whose finish touches
        # rows its first round did not: roll back and retry the batch rather than loop.
        stage = self.stage
        contended: dict[int, Outcome] = {}
        for _ in range(MAX_CONTENTION_ROUNDS):
            work = [r for r in rows if r.id not in contended]
            attempt = BatchReport(stage=stage.name)
            savepoint = conn.begin_nested()
            with held_until_commit() as events:  # a round undone logs nothing
                try:
                    outcomes = {**(dict(stage.process(conn, work, now)) if work else {}), **contended}
                    self.writer.outcomes(Write(conn, stage, job, now), rows, outcomes, attempt)
                    stage.finish(conn, work, outcomes, now)
                except Contended as busy:
                    savepoint.rollback()
                    later = Later(now + timedelta(seconds=busy.retry_in_seconds), busy.note)
                    contended.update({rid: later for rid in busy.row_ids})
                    continue
                except Exception as exc:
                    undo(savepoint, exc)  # the caller decides: a row's fault, or the batch's
                    raise
            savepoint.commit()
            release(events)
            report.add(attempt)
            return
        raise LostClaim(f"{stage.name}: shared rows still contended after {MAX_CONTENTION_ROUNDS} rounds")
