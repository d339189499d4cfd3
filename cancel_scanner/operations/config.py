"""The `reconcile:` and `prune:` sections of jobs.yaml: the daily jobs beside the stages."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictBool, StrictFloat, StrictInt

from cancel_scanner.engine.config import ClockTime, Section


class ReconcileConfig(Section):
    """The `reconcile:` section: the daily job comparing WeChat Pay's bill of yesterday with the tables."""

    enabled: StrictBool = True
    at: ClockTime = "10:00"  # Beijing time: WeChat's bill of yesterday exists from about 10:00
    retry_minutes: Annotated[StrictFloat | StrictInt, Field(ge=1, le=720)] = 30  # STATEMENT_CREATING: try again
    # A payment for an order cancelled here without a refund (its stock given back: the user paid for
    # nothing): booked and refunded once, by default; false only reports it.
    refund_orphan_payments: StrictBool = True


class PruneConfig(Section):
    """The `prune:` section: moving finished rows into the archive tables, as `prune` or a daily job."""

    enabled: StrictBool = False  # the daily job; `cancel-scanner prune` works either way
    at: ClockTime = "04:00"  # Beijing time
    older_than_days: Annotated[StrictInt, Field(ge=1, le=36_500)] = 90
    batch_size: Annotated[StrictInt, Field(ge=1, le=10_000)] = 500
