"""The daily jobs the daemon runs beside its stages, from the configuration: one function a job,
each returning the DailyJob or None when its section turns it off."""

from __future__ import annotations

from typing import Any

from cancel_scanner.engine.daemon import DailyJob


def jobs(app: Any) -> list[DailyJob]:
    """Every daily job ``app``'s configuration asks for."""
    from cancel_scanner.operations.ship_timeout import daily_job as ship_timeout_job

    found = (make(app) for make in (reconcile_job, prune_job, ship_timeout_job))
    return [job for job in found if job is not None]


FINAL_STATES = ("CLEAN", "DIFFERS", "NO_BILL")
MAX_FAILED_ATTEMPTS = 5  # a bad download is tried again a few times, then left to a person (and the alert)


def reconcile_job(app: Any) -> DailyJob | None:
    """Yesterday's bill (Beijing time) once a day from ``reconcile.at``; again every ``retry_minutes``
    while WeChat is still making it, or after a failure; nothing once the day is reconciled."""
    settings = app.config.reconcile
    if not settings.enabled:
        return None
    from datetime import datetime, timedelta

    from sqlalchemy import select

    from cancel_scanner.models import reconcile_run
    from cancel_scanner.operations.bill import fetch_bill
    from cancel_scanner.operations.reconcile import BEIJING, reconcile_day

    def run() -> float | None:
        day = (datetime.now(BEIJING) - timedelta(days=1)).date()
        with app.db.connect() as conn:
            done = conn.execute(
                select(reconcile_run.c.state, reconcile_run.c.attempts).where(reconcile_run.c.bill_date == day)
            ).first()
        if done is not None and (
            done.state in FINAL_STATES or (done.state == "FAILED" and done.attempts >= MAX_FAILED_ATTEMPTS)
        ):
            return None
        result = reconcile_day(
            app.db,
            lambda d: fetch_bill(app.gateway, d),
            day,
            now=app.runner.clock(),
            refund_orphans=settings.refund_orphan_payments,
        )
        return None if result.state in FINAL_STATES else settings.retry_minutes * 60.0

    return DailyJob("reconcile", settings.at, run, catch_up=True)


def prune_job(app: Any) -> DailyJob | None:
    """Finished rows older than ``prune.older_than_days`` into the archives, once a day at ``prune.at``.

    Stops between two batches when the daemon stops; what is left is the next day's (or `prune`'s).
    A failure is logged by the daemon, which tries again later: every batch is its own transaction."""
    settings = app.config.prune
    if not settings.enabled:
        return None
    from datetime import timedelta

    from loguru import logger

    from cancel_scanner.operations.prune import prune, summary

    def run() -> None:
        report = prune(
            app.db,
            older_than=timedelta(days=settings.older_than_days),
            batch_size=settings.batch_size,
            should_stop=app.runner.stopping.is_set,
        )
        logger.bind(stage="prune", action="daily_prune", moved=report.moved, stopped=report.stopped).info(
            summary(report)
        )
        return None

    return DailyJob("prune", settings.at, run)
