"""The daily jobs the daemon runs beside its stages, from the configuration: one function a job,
each returning the DailyJob or None when its section turns it off."""

from __future__ import annotations

from typing import Any

from cancel_scanner.engine.daemon import DailyJob


def jobs(app: Any) -> list[DailyJob]:
    """Every daily job ``app``'s configuration asks for."""
    found = (make(app) for make in (reconcile_job, prune_job))
    return [job for job in found if job is not None]


def reconcile_job(app: Any) -> DailyJob | None:
    return None  # not built yet: cancel_scanner.operations.reconcile


def prune_job(app: Any) -> DailyJob | None:
    return None  # not built yet: cancel_scanner.operations.prune
