"""The ship timeout's job (scanners/ship_timeout.py says which orders are due): every few minutes, and
once at start, a cancel request for each PAID order past ``jobs.intake.ship_timeout_hours``.

Exactly once: the due orders are locked (FOR UPDATE SKIP LOCKED) while their requests are inserted,
and read again under those locks, so an order with a ship-timeout request already, or any request
still pending, is left alone.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, insert, or_, select

from cancel_scanner.engine.sql import locked
from cancel_scanner.models import goods_order2, req_order_ops
from cancel_scanner.scanners.intake import Intake
from cancel_scanner.scanners.ship_timeout import SHIP_TIMEOUT_OP, SHIP_TIMEOUT_OPERATOR, unshipped

CHECK_EVERY_SECONDS = 300.0  # how often the daemon looks for orders past their timeout
BATCH = 500

o, q = goods_order2.c, req_order_ops.c


def request_cancels(db: Engine, now: datetime, timeout_hours: float, *, batch: int = BATCH) -> int:
    """Insert a cancel request for every order past its ship timeout; how many were inserted."""
    inserted = 0
    while True:
        with db.begin() as conn:
            due = conn.execute(
                locked(
                    conn,
                    select(o.id, o.paid_at)
                    .where(*unshipped(now - timedelta(hours=timeout_hours)))
                    .order_by(o.paid_at, o.id)
                    .limit(batch),
                    skip_locked=True,
                )
            ).all()
            found = len(due)
            if due:
                # Read again now that we hold them: the locking read's own look at req_order_ops may predate a
                # request another daemon committed just before it let go of the order (READ COMMITTED reads per
                # statement), so an order it asked for would be asked twice.
                asked = set(
                    conn.execute(
                        select(q.order_id).where(
                            q.order_id.in_([order.id for order in due]),
                            or_(q.op_type == SHIP_TIMEOUT_OP, and_(q.scanned == 0, q.success == 0)),
                        )
                    ).scalars()
                )
                due = [order for order in due if order.id not in asked]
            if due:
                conn.execute(
                    insert(req_order_ops),
                    [
                        {
                            "order_id": order.id,
                            "op_type": SHIP_TIMEOUT_OP,
                            "operator": SHIP_TIMEOUT_OPERATOR,
                            "reason": f"not shipped within {timeout_hours:g} h of payment",
                        }
                        for order in due
                    ],
                )
        inserted += len(due)
        if found < batch:
            return inserted


def daily_job(app: Any) -> Any:
    """The daemon's job (engine.daemon.DailyJob) that asks every few minutes, and at start; None when off."""
    settings = app.config.job(Intake.name)
    if settings.ship_timeout_hours is None or not settings.enabled:
        return None
    from loguru import logger

    from cancel_scanner.engine.daemon import DailyJob

    def run() -> float:
        asked = request_cancels(app.db, app.runner.clock(), settings.ship_timeout_hours)
        if asked:
            logger.bind(stage="ship_timeout", action="ship_timeout_requests", requests=asked).warning(
                "{} order(s) not shipped within {:g} h of payment: cancel requests inserted",
                asked,
                settings.ship_timeout_hours,
            )
        return CHECK_EVERY_SECONDS

    return DailyJob("ship_timeout", "00:00", run, catch_up=True)
