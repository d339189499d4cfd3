"""Reconciliation: one day of WeChat Pay's ALL bill against our tables.

Refunds are matched on ``out_refund_no``, then their amounts and final states compared. A refund
of ours is called missing at WeChat only after the bills of the day before and (when it exists)
the day after were searched too: the bill dates a refund by WeChat's clock, our ``submitted_at``
is ours. Payments in the bill for orders cancelled here without any refund are ORPHAN_PAYMENT:
money the shop holds for nothing (the user paid at the last second while the close went
through). With ``refund_orphans`` (the daemon's and the CLI's default, reconcile.refund_orphan_payments)
they are booked and refunded once through the normal flow; without, reported. A payment for an order still UNPAID here is UNBOOKED_PAYMENT and is handed to close_unpaid,
which books it. Two lines for one refund number or one payment are DUPLICATE_LINE; a bill whose
summary does not add up to its lines fails the day (operations.bill, BILL_TOTALS_DIFFER).

The day's differences replace its earlier ones in ``reconcile_diff`` in one transaction, and
``reconcile_run`` says how the day ended: CLEAN, DIFFERS, NO_BILL (WeChat had no trades and
neither had we), WAITING (the bill is not ready: try again), FAILED (a bad hash or format).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Engine, Row, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from cancel_scanner.engine.outcome import clip
from cancel_scanner.engine.sql import locked
from cancel_scanner.models import goods, goods_order2, reconcile_diff, reconcile_run, refund_order, refund_order_archive
from cancel_scanner.scanners.intake import refund_row
from cancel_scanner.scanners.shop import write_oplog

BEIJING = timezone(timedelta(hours=8))
# Our submitted_at is later than WeChat's acceptance, and clocks drift: a refund of ours near
# midnight may sit in the neighbouring day's bill. Our refunds of a day are taken this much early.
EDGE = timedelta(minutes=10)
CHUNK = 1_000  # ids per IN (...) query
# The bill's refund states, and older bills' names for them.
BILL_STATUS = {
    "SUCCESS": "SUCCESS",
    "PROCESSING": "PROCESSING",
    "CLOSED": "CLOSED",
    "REFUNDCLOSE": "CLOSED",
    "ABNORMAL": "ABNORMAL",
    "CHANGE": "ABNORMAL",
}
ORPHAN_REASON = "订单已取消，退还款项"  # what the user reads on the refund: "order cancelled, payment returned"
_log = logger.bind(stage="reconcile")
r, ra, o = refund_order.c, refund_order_archive.c, goods_order2.c


@dataclass(frozen=True)
class Diff:
    kind: str
    out_trade_no: str
    detail: str
    out_refund_no: str | None = None
    ours_fen: int | None = None
    theirs_fen: int | None = None
    ours_status: str | None = None
    theirs_status: str | None = None


@dataclass(frozen=True)
class DayResult:
    bill_date: date
    state: str  # CLEAN | DIFFERS | NO_BILL | WAITING | FAILED
    diffs: tuple[Diff, ...] = ()
    bill_rows: int = 0
    message: str | None = None  # why WAITING or FAILED
    refunded_orphans: tuple[str, ...] = ()  # out_trade_no of the orphan payments a refund was opened for
    counts: dict[str, int] = field(default_factory=dict)


def day_bounds(bill_date: date) -> tuple[datetime, datetime]:
    """The Beijing day as naive UTC (the tables' times)."""
    start = datetime.combine(bill_date, time(0), BEIJING).astimezone(UTC).replace(tzinfo=None)
    return start, start + timedelta(days=1)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), CHUNK):
        yield values[i : i + CHUNK]


def _ours_by_number(conn: Connection, numbers: Sequence[str]) -> dict[str, Any]:
    """Our refunds by out_refund_no: the live table first, then the archive for the others (a refund
    prune moves between the two reads is then found in the archive, never missed)."""
    found: dict[str, Any] = {}
    for c in (r, ra):
        wanted = [n for n in numbers if n not in found]
        for part in _chunks(wanted):
            query = select(c.out_refund_no, c.out_trade_no, c.refund_amount, c.wx_status, c.progress_scanned).where(
                c.out_refund_no.in_(part)
            )
            found.update({row.out_refund_no: row for row in conn.execute(query)})
    return found


def compare(conn: Connection, bill: Any, neighbours: Sequence[Any] = ()) -> list[Diff]:
    """The differences between ``bill`` (one day) and the tables; ``neighbours``: the bills of the days around it."""
    diffs: list[Diff] = _duplicates(bill)
    theirs = {refund.out_refund_no: refund for refund in bill.refunds}
    ours = _ours_by_number(conn, sorted(theirs))
    for number, refund in sorted(theirs.items()):
        mine = ours.get(number)
        status = BILL_STATUS.get(refund.status, refund.status)
        if mine is None:
            diffs.append(
                Diff(
                    "MISSING_HERE",
                    refund.out_trade_no,
                    f"WeChat refunded {refund.refund_fen} fen under {number}, which is in none of our tables",
                    number,
                    None,
                    refund.refund_fen,
                    None,
                    status,
                )
            )
            continue
        if mine.refund_amount != refund.refund_fen:
            diffs.append(
                Diff(
                    "AMOUNT_DIFFERS",
                    refund.out_trade_no,
                    f"we asked {mine.refund_amount} fen, WeChat's bill says {refund.refund_fen}",
                    number,
                    mine.refund_amount,
                    refund.refund_fen,
                    mine.wx_status,
                    status,
                )
            )
        finished = mine.progress_scanned == 1
        if finished and {mine.wx_status, status} == {"SUCCESS", "CLOSED"}:
            diffs.append(
                Diff(
                    "STATUS_DIFFERS",
                    refund.out_trade_no,
                    f"we recorded {mine.wx_status}, WeChat's bill says {status}",
                    number,
                    mine.refund_amount,
                    refund.refund_fen,
                    mine.wx_status,
                    status,
                )
            )

    known = set(theirs) | {refund.out_refund_no for other in neighbours for refund in other.refunds}
    start, end = day_bounds(bill.bill_date)
    # The live table first, then the archive (prune may have moved the day's refunds, or move one
    # between the two reads): a refund WeChat lost is reported wherever it is kept.
    submitted: dict[str, Any] = {}
    for c in (r, ra):
        for mine in conn.execute(
            select(c.out_refund_no, c.out_trade_no, c.refund_amount, c.wx_status)
            .where(c.submitted_at >= start - EDGE, c.submitted_at < end - EDGE, c.submit_success == 1)
            .order_by(c.id)
        ):
            submitted.setdefault(mine.out_refund_no, mine)
    for mine in submitted.values():
        if mine.out_refund_no not in known:
            diffs.append(
                Diff(
                    "MISSING_AT_WECHAT",
                    mine.out_trade_no,
                    f"WeChat accepted {mine.out_refund_no} here, but neither"
                    " this day's bill nor its neighbours' list it",
                    mine.out_refund_no,
                    mine.refund_amount,
                    None,
                    mine.wx_status,
                    None,
                )
            )

    diffs += _orphans(conn, bill)
    diffs += _unbooked(conn, bill)
    return diffs


def _duplicates(bill: Any) -> list[Diff]:
    """Two lines of one bill for one refund number, or for one payment: a difference of their own
    (matching by number would silently take one of them)."""
    diffs = []
    seen: dict[str, Any] = {}
    for refund in bill.refunds:
        if refund.out_refund_no in seen:
            diffs.append(
                Diff(
                    "DUPLICATE_LINE",
                    refund.out_trade_no,
                    f"the bill lists refund {refund.out_refund_no} twice"
                    f" ({seen[refund.out_refund_no].refund_fen} and {refund.refund_fen} fen)",
                    refund.out_refund_no,
                    None,
                    refund.refund_fen,
                    None,
                    BILL_STATUS.get(refund.status, refund.status),
                )
            )
        seen.setdefault(refund.out_refund_no, refund)
    paid: dict[str, Any] = {}
    for payment in bill.payments:
        if payment.status != "SUCCESS":
            continue
        if payment.out_trade_no in paid:
            diffs.append(
                Diff(
                    "DUPLICATE_LINE",
                    payment.out_trade_no,
                    f"the bill lists payment {payment.transaction_id}"
                    f" of {payment.out_trade_no} twice ({payment.total_fen} fen)",
                    None,
                    None,
                    payment.total_fen,
                    None,
                    "SUCCESS",
                )
            )
        paid.setdefault(payment.out_trade_no, payment)
    return diffs


def _unbooked(conn: Connection, bill: Any) -> list[Diff]:
    """Payments WeChat took for orders still UNPAID here: the notification was lost, and the payment
    side (close_unpaid) has not found it. Each is handed to close_unpaid (unbook_to_close_unpaid)."""
    paid, orders = _paid_orders(
        conn, bill, [o.order_no], o.order_status == "UNPAID", o.pay_status == 0, o.is_deleted == 0
    )
    return [
        _paid_diff(
            "UNBOOKED_PAYMENT",
            paid[order.order_no],
            "UNPAID",
            "; the order is still UNPAID here: handed to close_unpaid to book it",
        )
        for order in orders
    ]


def _paid_orders(conn: Connection, bill: Any, columns: list[Any], *where: Any) -> tuple[dict[str, Any], list[Row]]:
    """The bill's successful payments by out_trade_no, and ``columns`` of our orders among them that
    match ``where``."""
    paid = {p.out_trade_no: p for p in bill.payments if p.status == "SUCCESS"}
    orders: list[Row] = []
    for part in _chunks(sorted(paid)):
        orders += conn.execute(select(*columns).where(o.order_no.in_(part), *where)).all()
    return paid, orders


def _paid_diff(kind: str, payment: Any, ours_status: str, why: str) -> Diff:
    """A payment WeChat took that this database does not show as paid; ``why`` follows its amount."""
    return Diff(
        kind,
        payment.out_trade_no,
        f"the user paid {payment.total_fen} fen ({payment.transaction_id}){why}",
        theirs_fen=payment.total_fen,
        ours_status=ours_status,
        theirs_status="SUCCESS",
    )


def hand_to_close_unpaid(db: Engine, diffs: Sequence[Diff], now: datetime) -> int:
    """Make the UNBOOKED_PAYMENT orders due for close_unpaid now, which queries WeChat and books the
    payment as a found one (and refunds it if a cancel was asked for). Only orders still unpaid."""
    numbers = sorted({d.out_trade_no for d in diffs if d.kind == "UNBOOKED_PAYMENT"})
    handed = 0
    with db.begin() as conn:
        for part in _chunks(numbers):
            handed += (
                conn.execute(
                    update(goods_order2)
                    .where(
                        o.order_no.in_(part),
                        o.order_status == "UNPAID",
                        o.pay_status == 0,
                        o.is_deleted == 0,
                        o.close_lease_owner.is_(None),
                        # a row left for a person (1/0) keeps its reason: reported, not requeued every day
                        or_(o.close_scanned == 0, o.close_success == 1),
                    )
                    .values(
                        close_scanned=0,
                        close_success=0,
                        close_attempts=0,
                        close_next_attempt_at=now,
                        close_last_error="UNBOOKED_PAYMENT: WeChat's bill shows it paid; reconcile asked for it to be booked",
                    )
                ).rowcount
                or 0
            )
    if handed:
        _log.bind(action="unbooked_handed", orders=handed).warning(
            "{} payment(s) WeChat took for orders unpaid here: handed to close_unpaid", handed
        )
    return handed


def _orphans(conn: Connection, bill: Any) -> list[Diff]:
    paid, orders = _paid_orders(conn, bill, [o.id, o.order_no], o.order_status == "CANCELLED")
    if not orders:
        return []
    with_refund: set[int] = set()
    for _table, c in ((refund_order, r), (refund_order_archive, ra)):
        for part in _chunks([order.id for order in orders]):
            with_refund |= set(conn.execute(select(c.order_id).where(c.order_id.in_(part)).distinct()).scalars())
    return [
        _paid_diff("ORPHAN_PAYMENT", paid[order.order_no], "CANCELLED", " for an order cancelled here without a refund")
        for order in orders
        if order.id not in with_refund
    ]


def refund_orphan(db: Engine, payment: Any, now: datetime) -> bool:
    """Book a payment WeChat has for a cancelled order without a refund, and open its refund.

    The order was cancelled as unpaid (stock given back, sales never counted): the payment is
    booked as the shop books one (``pay_status=1``, ``transaction_id``, ``paid_at``, ``sales +=
    quantity``) and a full refund opened, which the flow sends, follows and writes back (REFUNDED,
    then sales down again). Under the order's lock, and only while it still has no refund and no
    payment of its own: anything else is a person's to judge, and stays reported."""
    with db.begin() as conn:
        order = conn.execute(locked(conn, select(goods_order2).where(o.order_no == payment.out_trade_no))).first()
        if order is None or order.order_status != "CANCELLED" or order.pay_status != 0 or order.refund_status != "NONE":
            return False
        if order.total_amount != payment.total_fen:
            return False  # paid another amount than the order's: a person decides
        if conn.execute(select(func.count()).select_from(refund_order).where(r.order_id == order.id)).scalar_one():
            return False
        paid_at = payment.at.astimezone(UTC).replace(tzinfo=None) if payment.at else now
        moved = conn.execute(
            update(goods_order2)
            .where(o.id == order.id, o.pay_status == 0, o.refund_status == "NONE")
            .values(pay_status=1, transaction_id=payment.transaction_id, paid_at=paid_at, refund_status="REFUNDING")
        ).rowcount
        if moved != 1:
            raise RuntimeError(f"reconcile: order {order.id} locked but not booked")
        conn.execute(update(goods).where(goods.c.id == order.goods_id).values(sales=goods.c.sales + order.quantity))
        conn.execute(
            insert(refund_order).values(
                **refund_row(
                    order.id,
                    order.order_no,
                    payment.transaction_id,
                    payment.total_fen,
                    ORPHAN_REASON,
                    now,
                    channel=order.channel,
                )
            )
        )
        write_oplog(
            conn,
            [
                (
                    order.id,
                    "ORPHAN_PAYMENT_REFUND",
                    clip(
                        f"{payment.transaction_id} {payment.total_fen} fen paid after the cancel: payment booked, refund opened"
                    ),
                )
            ],
        )
    _log.bind(action="orphan_refunded", out_trade_no=payment.out_trade_no).warning(
        "a payment for a cancelled order: refund opened"
    )
    return True


def _record(db: Engine, result: DayResult, now: datetime) -> None:
    """The day's differences replace its earlier ones; its run row says how it ended."""
    values = {
        "state": result.state,
        "bill_rows": result.bill_rows,
        "diffs": len(result.diffs),
        "last_error": clip(result.message) if result.message else None,
    }
    for attempt in (1, 2):
        try:
            return _record_once(db, result, values, now)
        except IntegrityError:  # another reconciliation of the day created its run row first: it is locked now
            if attempt == 2:
                raise


def _record_once(db: Engine, result: DayResult, values: dict, now: datetime) -> None:
    values = dict(values)
    run = reconcile_run.c
    with db.begin() as conn:
        # The day's run row first, locked: two reconciliations of one day (two daemons, or a person
        # beside the daily job) write their rows one after the other, never both sets.
        if conn.execute(locked(conn, select(run.bill_date).where(run.bill_date == result.bill_date))).first() is None:
            conn.execute(insert(reconcile_run).values(bill_date=result.bill_date, state=result.state, attempts=0))
        if result.state not in ("WAITING", "FAILED"):
            conn.execute(delete(reconcile_diff).where(reconcile_diff.c.bill_date == result.bill_date))
            rows = [
                {
                    "bill_date": result.bill_date,
                    **{
                        k: getattr(d, k)
                        for k in (
                            "kind",
                            "out_trade_no",
                            "out_refund_no",
                            "ours_fen",
                            "theirs_fen",
                            "ours_status",
                            "theirs_status",
                        )
                    },
                    "detail": clip(d.detail),
                }
                for d in result.diffs
            ]
            for part in _chunks(rows):
                conn.execute(insert(reconcile_diff), list(part))
            values["finished_at"] = now
        else:
            values.pop("diffs")
            values.pop("bill_rows")
        conn.execute(
            update(reconcile_run).where(run.bill_date == result.bill_date).values(**values, attempts=run.attempts + 1)
        )


def reconcile_day(
    db: Engine, fetch: Callable[[date], Any], bill_date: date, *, now: datetime, refund_orphans: bool = False
) -> DayResult:
    """Fetch, compare, record one day. ``fetch(day)`` is operations.bill.fetch_bill bound to a gateway."""
    from cancel_scanner.operations.bill import Bill, BillError, BillNotReady, NoBill

    try:
        bill = fetch(bill_date)
    except BillError as exc:
        result = DayResult(bill_date, "FAILED", message=f"{exc.code}: {exc.message}")
        _record(db, result, now)
        _log.bind(action="failed", bill_date=str(bill_date)).error(
            "reconciliation of {} failed: {}", bill_date, result.message
        )
        return result
    if isinstance(bill, BillNotReady):
        result = DayResult(bill_date, "WAITING", message=f"{bill.code}: {bill.message}")
        _record(db, result, now)
        return result
    empty = isinstance(bill, NoBill)
    if empty:
        bill = Bill(bill_date=bill_date, refunds=(), payments=(), rows=0)
    neighbours = []
    for day in (bill_date - timedelta(days=1), bill_date + timedelta(days=1)):
        try:
            other = fetch(day)
        except BillError:
            continue
        if isinstance(other, Bill):
            neighbours.append(other)
    with db.connect() as conn:
        diffs = compare(conn, bill, neighbours)
    hand_to_close_unpaid(db, diffs, now)
    refunded: list[str] = []
    if refund_orphans:
        payments = {p.out_trade_no: p for p in bill.payments if p.status == "SUCCESS"}
        for diff in diffs:
            if diff.kind == "ORPHAN_PAYMENT" and refund_orphan(db, payments[diff.out_trade_no], now):
                refunded.append(diff.out_trade_no)
    state = "DIFFERS" if diffs else ("NO_BILL" if empty else "CLEAN")
    counts: dict[str, int] = {}
    for diff in diffs:
        counts[diff.kind] = counts.get(diff.kind, 0) + 1
    result = DayResult(bill_date, state, tuple(diffs), bill.rows, None, tuple(refunded), counts)
    _record(db, result, now)
    log = _log.bind(
        action="reconciled", bill_date=str(bill_date), state=state, **{k.lower(): n for k, n in counts.items()}
    )
    (log.warning if diffs else log.info)(
        "reconciled {}: {} bill rows, {} difference(s)", bill_date, bill.rows, len(diffs)
    )
    return result
