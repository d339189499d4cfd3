"""The one place that runs a stage's batch and says how it ended.

A stage's batch is a ``DatabaseBatch`` (claim, process, flip, finish: one transaction) or a
``GatewayBatch`` (budget, lease, call outside any transaction, write the answers back), chosen once
per stage by its kind. Whatever the batch, the runner turns a failure of the database into the
batch's result (``engine.batch``: Lost, Backoff, Blocked), so a driver reads one value, and
``run_until_idle`` drives the stages with the same ``next_step`` the daemon uses.

Time: every time the engine compares (due times, leases, heartbeats) comes from one clock, the
database's (``engine.clock.DbClock``), read once per batch. Tests inject their own clock in its place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, cast

from loguru import logger
from sqlalchemy import Column, Engine, update

from cancel_scanner.engine.batch import (
    MAX_LOST_IN_A_ROW,
    Again,
    Backoff,
    BatchReport,
    Blocked,
    Fail,
    Hooks,
    Idle,
    Lost,
    Streak,
    next_step,
)
from cancel_scanner.engine.claim import Claimer
from cancel_scanner.engine.clock import DbClock, local_utcnow
from cancel_scanner.engine.config import EngineConfig
from cancel_scanner.engine.db import is_mysql
from cancel_scanner.engine.db_batch import DatabaseBatch
from cancel_scanner.engine.errors import describe_db_error, is_environment_db_error, is_lost_race, is_transient_db_error
from cancel_scanner.engine.gateway_batch import GatewayBatch
from cancel_scanner.engine.registry import Registry
from cancel_scanner.engine.settings import GatewayJobSettings
from cancel_scanner.engine.stage import DbStage, GatewayStage, Stage
from cancel_scanner.engine.writes import FlagWriter, LostClaim

__all__ = ["MAX_LOST_IN_A_ROW", "BatchReport", "Hooks", "LostClaim", "Runner", "utcnow"]

MAX_IDLE_ROUNDS = 10_000
utcnow = local_utcnow  # this host's clock: for display only, never for a comparison the engine makes


class Runner:
    def __init__(
        self,
        db: Engine,
        config: EngineConfig,
        stages: Mapping[str, Stage],
        gateway: Any = None,
        *,
        clock: Callable[[], datetime] | None = None,
        owner: str | None = None,
        hooks: Hooks | None = None,
        registry: Registry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        on_batch: Callable[[BatchReport, float], None] | None = None,
    ):
        self.db = db
        self.config = config
        self.stages = dict(stages)
        self.gateway = gateway
        self.clock = clock or DbClock(db)
        self.hooks = hooks or Hooks()
        self.monotonic = monotonic
        # An observer of every batch (report, seconds): the monitoring's counters.
        self.on_batch = on_batch
        # The gateway's share of its pace group's limits, when an enabled stage calls it.
        calls = any(self._leased(s) and config.job(n).enabled for n, s in self.stages.items())
        share = getattr(gateway, "pace_share", None) if calls else None
        self.pace = share(config.heartbeat_seconds) if share is not None else None
        self.registry = registry or Registry(
            db,
            self.clock,
            self.lease_columns(),
            takeover_seconds=config.takeover_seconds,
            heartbeat_seconds=config.heartbeat_seconds,
            monotonic=monotonic,
            owner=owner,
            pace_group=self.pace.group if self.pace else None,
            pace_limits=self.pace.limits if self.pace else None,
            on_share=self.pace.on_share if self.pace else None,
        )
        self.stopping = threading.Event()
        mysql = is_mysql(db)
        claimer = Claimer(self.registry, mysql=mysql, monotonic=monotonic)
        writer = FlagWriter(claimer)
        self.batches: dict[str, DatabaseBatch | GatewayBatch] = {
            name: GatewayBatch(
                db,
                cast(GatewayStage, stage),
                gateway,
                claimer=claimer,
                writer=writer,
                registry=self.registry,
                pace=self.pace,
                hooks=self.hooks,
                stopping=self.stopping,
                monotonic=monotonic,
                mysql=mysql,
            )
            if self._leased(stage)
            else DatabaseBatch(db, cast(DbStage, stage), claimer, writer, self.hooks)
            for name, stage in self.stages.items()
        }

    @staticmethod
    def _leased(stage: Stage) -> bool:
        return stage.flags.lease_owner is not None

    @property
    def owner(self) -> str:
        """The lease owner this process writes now (a new one after it was declared dead)."""
        return self.registry.owner

    @property
    def pace_disagreement(self) -> str | None:
        """Set while the processes of our pace group were configured with different limits: says who."""
        return self.pace.disagreement if self.pace else None

    def lease_columns(self) -> list[tuple[Column, Column]]:
        """(lease_owner, lease_until) of every gateway stage: what a dead process may still hold."""
        pairs = {
            (s.flags.lease_owner, s.flags.lease_until)
            for s in self.stages.values()
            if s.flags.lease_owner is not None and s.flags.lease_until is not None
        }
        return sorted(pairs, key=lambda pair: (pair[0].table.name, pair[0].name))

    def holds_leases(self, name: str) -> bool:
        """True for a stage whose rows are leased while it calls out: a dead process's are taken over."""
        return self._leased(self.stages[name])

    def lanes(self, name: str) -> int:
        """How many batches of ``name`` may run at once when it has a backlog."""
        return self.batches[name].lanes

    # --- public ---------------------------------------------------------------------------------

    def run_stage(self, name: str, now: datetime | None = None) -> BatchReport:
        """Run one batch of one stage. ``now`` fixes the clock for the whole batch (tests)."""
        job = self.config.job(name)
        report = BatchReport(stage=name, batch_size=job.batch_size)
        if self.stopping.is_set():
            return report
        started = time.perf_counter()
        log = logger.bind(stage=name)
        batch = self.batches[name]
        try:
            if isinstance(batch, GatewayBatch):
                batch.run(cast(GatewayJobSettings, job), (lambda: now) if now is not None else self.clock, report)
            else:
                batch.run(job, now or self.clock(), report)
            if isinstance(report.result, Idle):  # the batch ran to its end (it sets only Paced and Backoff itself)
                report.settle()
        except Exception as exc:  # noqa: BLE001 - _failure re-raises whatever is not the database's failure
            report.result = _failure(exc)
            report.clear_rows()  # its write-back (one transaction) rolled back whole: none of its rows is done
            # DEBUG: the caller (the daemon's backoff) reports the failure once per step.
            log.bind(action="batch_aborted").debug("batch rolled back, will retry: {}", report.result)
        if report.claimed:
            log.bind(action="batch", **report.counts()).info("batch finished")
        if self.on_batch is not None:
            self.on_batch(report, time.perf_counter() - started)
        return report

    def run_until_idle(
        self, now: datetime | None = None, stages: Iterable[str] | None = None, max_rounds: int = MAX_IDLE_ROUNDS
    ) -> dict[str, BatchReport]:
        """Run the stages in flow order until none has a ready row (at ``now``, if given)."""
        names = [n for n in (stages or self.stages) if self.config.job(n).enabled]
        totals = {n: BatchReport(stage=n) for n in names}
        streak = Streak()
        for _ in range(max_rounds):
            progressed = False
            for name in names:
                while not self.stopping.is_set():
                    report = self.run_stage(name, now)
                    totals[name].add(report)
                    progressed = progressed or report.progressed
                    step, streak = next_step(report.result, streak)
                    if isinstance(step, Fail):
                        raise RuntimeError(f"stage {name} stopped: {step.reason}")
                    if not isinstance(step, Again):
                        break
                    if step.after:
                        self.stopping.wait(step.after)
            if not progressed or self.stopping.is_set():
                return totals
        raise RuntimeError(f"stages still busy after {max_rounds} rounds")

    def stop(self) -> None:
        """Stop claiming; calls not yet started are skipped and their leases released."""
        self.stopping.set()

    def release_leases(self) -> int:
        """Give back every lease this runner holds (clean shutdown), and leave the registry."""
        released = 0
        for owner_col, until_col in self.lease_columns():
            with self.db.begin() as conn:
                res = conn.execute(
                    update(owner_col.table).where(owner_col == self.owner).values({owner_col: None, until_col: None})
                )
                released += res.rowcount or 0
        self.registry.deregister()
        return released

    def close(self) -> None:
        for batch in self.batches.values():
            if isinstance(batch, GatewayBatch):
                batch.close()


def _failure(exc: Exception) -> Blocked | Lost | Backoff:
    """The result of a batch that rolled back on ``exc``; anything but the database's failure is re-raised."""
    if is_environment_db_error(exc):
        return Blocked(describe_db_error(exc))
    if isinstance(exc, LostClaim) or is_lost_race(exc):
        # Another daemon won these rows (on Galera: certification at COMMIT): our batch rolled
        # back whole, so nothing happened; the caller looks again at once.
        return Lost(f"LostClaim: {exc}" if isinstance(exc, LostClaim) else describe_db_error(exc))
    if is_transient_db_error(exc):
        return Backoff(describe_db_error(exc))
    raise exc
