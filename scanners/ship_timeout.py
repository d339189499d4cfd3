"""Orders nobody ships: a PAID order not shipped within ``jobs.intake.ship_timeout_hours`` of its payment
becomes a cancel request of its own (off by default).

The shop's own rule for a delivery timeout: notify the merchant, or refund. So the ``ship_due`` figure
(`status`, the ``cancel_scanner_orders_ship_due`` gauge, the ``ship_due`` alert) counts the orders
``ship_warn_hours`` before their timeout, and at the timeout the daemon inserts, for each, what a
merchant's tool would: a ``req_order_ops`` row, ``op_type`` ``SHIP_TIMEOUT_CANCEL``, ``operator``
``ship_timeout``. Intake then cancels and refunds the units left like any request, with
``cancel_source`` ``SHIP_TIMEOUT``.

Here: the settings, which orders are due, and the count; the daemon's job that inserts the requests
(its own transactions) is cancel_scanner/operations/ship_timeout.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StrictFloat, StrictInt
from sqlalchemy import Connection, and_, exists, func, or_, select

from cancel_scanner.engine.settings import JobSettings
from cancel_scanner.models import goods_order2, req_order_ops

SHIP_TIMEOUT_OP = "SHIP_TIMEOUT_CANCEL"
SHIP_TIMEOUT_OPERATOR = "ship_timeout"

o, q = goods_order2.c, req_order_ops.c


class IntakeSettings(JobSettings):
    """Intake's keys beside a stage's: the ship timeout (hours after payment; None: off) and its warning."""

    ship_timeout_hours: Annotated[StrictFloat | StrictInt, Field(ge=1, le=24 * 365)] | None = None
    ship_warn_hours: Annotated[StrictFloat | StrictInt, Field(ge=0, le=24 * 365)] = 12


def unshipped(paid_before: datetime) -> list:
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
    return conn.execute(select(func.count()).select_from(goods_order2).where(*unshipped(paid_before))).scalar_one()
