"""Partial cancels: what a part of an order refunds, and WeChat's rules for several refunds of one payment.

The amount rule (docs/contract.md, "Partial cancels"): an order of ``quantity`` units paid
``total_amount`` fen refunds, once ``c`` of its units are cancelled, ``floor(total_amount * c /
quantity)`` fen in all. A cancel of ``k`` more units therefore refunds

    floor(total_amount * (c + k) / quantity) - floor(total_amount * c / quantity)

fen: each unit's share, with the rounding carried from one part to the next instead of
being lost, so the refunds of an order never exceed what was paid and add up to exactly
``total_amount`` once every unit is cancelled (the last part takes the fen the earlier ones
rounded down). Integers only; no float touches an amount.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, func, select

from cancel_scanner.models import refund_order, refund_order_archive

MAX_REFUNDS_PER_PAYMENT = 50  # WeChat: at most 50 refunds of one payment
DEFAULT_REFUND_SPACING_SECONDS = 60  # WeChat: two refund applications of one payment at least a minute apart


def refunded_for(total_amount: int, quantity: int, cancelled: int) -> int:
    """Fen refunded in all once ``cancelled`` of the order's ``quantity`` units are cancelled."""
    if quantity <= 0 or not 0 <= cancelled <= quantity or total_amount < 0:
        raise ValueError(f"no share of {total_amount} fen for {cancelled} of {quantity} units")
    return total_amount * cancelled // quantity


def part_amount(total_amount: int, quantity: int, cancelled_before: int, units: int) -> int:
    """Fen a cancel of ``units`` more units refunds, after ``cancelled_before`` were cancelled."""
    return refunded_for(total_amount, quantity, cancelled_before + units) - refunded_for(
        total_amount, quantity, cancelled_before
    )


def part_event(event: str, refund_seq: int) -> str:
    """The oplog event of a partial cancel (``PART_CANCELLED#2``): always numbered by its refund, so a part's
    events never take the names the order's own cancel writes later (CANCELLED, STOCK_RESTORED, ...)."""
    return f"{event}#{refund_seq}"


def refunds_of(conn: Connection, order_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Per order: how many refunds it has had and its highest refund_seq, the live table's and those
    `prune` archived together (read under the order's row lock). An order still being shipped may have
    its settled parts archived: the next refund's number and WeChat's 50 count on all of them."""
    wanted = sorted(set(order_ids))
    found: dict[int, tuple[int, int]] = {}
    if not wanted:
        return found
    for table in (refund_order, refund_order_archive):
        t = table.c
        for order_id, count, last in conn.execute(
            select(t.order_id, func.count(), func.max(t.refund_seq)).where(t.order_id.in_(wanted)).group_by(t.order_id)
        ).all():
            before = found.get(order_id, (0, 0))
            found[order_id] = (before[0] + count, max(before[1], last))
    return found
