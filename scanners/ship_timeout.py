"""Orders nobody ships: a PAID order not shipped within ``jobs.intake.ship_timeout_hours`` of its payment
becomes a cancel request of its own (off by default).

The shop's own rule for a delivery timeout: notify the merchant, or refund. So the ``ship_due`` figure
(`status`, the ``cancel_scanner_orders_ship_due`` gauge, the ``ship_due`` alert) counts the orders
``ship_warn_hours`` before their timeout, and at the timeout the daemon inserts, for each, what a
merchant's tool would: a ``req_order_ops`` row, ``op_type`` ``SHIP_TIMEOUT_CANCEL``, ``operator``
``ship_timeout``. Intake then cancels and refunds the units left like any request, with
``cancel_source`` ``SHIP_TIMEOUT``.

Exactly once: the due orders are locked (FOR UPDATE SKIP LOCKED) while their requests are inserted,
and an order with a ship-timeout request already, or any request still pending, is left alone.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import Field, StrictFloat, StrictInt
from sqlalchemy import Connection, Engine, and_, exists, func, insert, or_, select

from cancel_scanner.engine.settings import JobSettings
from cancel_scanner.engine.sql import locked
from cancel_scanner.models import goods_order2, req_order_ops

SHIP_TIMEOUT_OP = "SHIP_TIMEOUT_CANCEL"
SHIP_TIMEOUT_OPERATOR = "ship_timeout"
CHECK_EVERY_SECONDS = 300.0  # how often the daemon looks for orders past their timeout
BATCH = 500

o, q = goods_order2.c, req_order_ops.c


class IntakeSettings(JobSettings):
    """Intake's keys beside a stage's: the ship timeout (hours after payment; None: off) and its warning."""

    ship_timeout_hours: Annotated[StrictFloat | StrictInt, Field(ge=1, le=24 * 365)] | None = None
    ship_warn_hours: Annotated[StrictFloat | StrictInt, Field(ge=0, le=24 * 365)] = 12


def _unshipped(paid_before: datetime) -> list:
    """PAID orders paid before the cutoff with no ship-timeout request and no request still pending."""
    asked = exists().where(q.order_id == o.id, or_(q.op_type == SHIP_TIMEOUT_OP, and_(q.scanned == 0, q.success == 0)))
    return [
        o.order_status == "PAID",
        o.pay_status == 1,
        o.is_deleted == 0,
        o.cancel_requested_at.is_(None),  # a cancel close_unpaid is still settling is that request's
        o.paid_at <= paid_before,
        ~asked,
    ]


def ship_due(conn: Connection, paid_before: datetime) -> int:
    """How many orders paid before ``paid_before`` are still unshipped and not yet asked to be cancelled."""
    return conn.execute(select(func.count()).select_from(goods_order2).where(*_unshipped(paid_before))).scalar_one()


def request_cancels(db: Engine, now: datetime, timeout_hours: float, *, batch: int = BATCH) -> int:
    """Insert a cancel request for every order past its ship timeout; how many were inserted."""
    inserted = 0
    while True:
        with db.begin() as conn:
            due = conn.execute(
                locked(
                    conn,
                    select(o.id, o.paid_at)
                    .where(*_unshipped(now - timedelta(hours=timeout_hours)))
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
    settings = app.config.job("intake")
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
