"""Rows for prune's tests: finished orders and one of every kind of row that must stay, and how to compare.

Shared by tests/integration/test_prune.py and tests/acceptance/test_prune.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, insert, select, text

from cancel_scanner import models
from cancel_scanner.engine.clock import DbClock

LIVE = (models.req_order_ops, models.refund_order, models.oplog)
AGE = timedelta(days=90)
OLD = timedelta(days=100)  # before the cutoff
YOUNG = timedelta(hours=1)  # after it


@dataclass
class Seeded:
    moves: dict[str, set[int]] = field(default_factory=dict)  # table -> ids prune must move
    stays: dict[str, set[int]] = field(default_factory=dict)  # table -> ids that must stay

    def add(self, table: str, row_id: int, moves: bool) -> None:
        (self.moves if moves else self.stays).setdefault(table, set()).add(row_id)
        (self.stays if moves else self.moves).setdefault(table, set())


def db_now(db: Engine) -> datetime:
    return DbClock(db)()


def seed(db: Engine, finished_orders: int = 40) -> Seeded:
    """Finished orders 1..N, then one order per case that must stay; old rows first, young rows last (ids follow time)."""
    now = db_now(db)
    old, young = now - OLD, now - YOUNG
    s = Seeded()
    orders, requests, refunds, events = [], [], [], []

    def order(oid: int, **kw) -> None:
        orders.append(
            {
                "id": oid,
                "order_no": f"SO{oid:010d}",
                "user_id": 7,
                "merchant_id": 9,
                "goods_id": 1,
                "quantity": 1,
                "total_amount": 1280,
                "pay_status": 1,
                "transaction_id": f"4200{oid:012d}",
                "order_status": "CANCELLED",
                "refund_status": "REFUNDED",
                "created_at": old,
                "updated_at": old,
                **kw,
            }
        )

    def request(rid: int, oid: int, flags: tuple[int, int], moves: bool, created=old, updated=None, code="OK") -> None:
        requests.append(
            {
                "id": rid,
                "order_id": oid,
                "op_type": "MERCHANT_CANCEL",
                "operator": "clerk-1",
                "reason": "out of stock",
                "scanned": flags[0],
                "success": flags[1],
                "result_code": code if flags[0] else None,
                "result_msg": "cancelled" if flags[0] else None,
                "scanned_at": created if flags[0] else None,
                "created_at": created,
                "updated_at": updated or created,
            }
        )
        s.add("req_order_ops", rid, moves)

    def refund(
        fid: int,
        oid: int,
        moves: bool,
        seq: int = 1,
        flags=(1, 1, 1, 1, 1, 1),
        status="SUCCESS",
        lease=None,
        created=old,
        updated=None,
    ) -> None:
        refunds.append(
            {
                "id": fid,
                "order_id": oid,
                "req_id": oid,
                "refund_seq": seq,
                "out_refund_no": f"CSR{oid}-{seq}",
                "out_trade_no": f"SO{oid:010d}",
                "transaction_id": f"4200{oid:012d}",
                "refund_amount": 1280,
                "total_amount": 1280,
                "reason": "out of stock",
                "submit_scanned": flags[0],
                "submit_success": flags[1],
                "wx_refund_id": f"50{fid:010d}",
                "wx_status": status,
                "progress_scanned": flags[2],
                "progress_success": flags[3],
                "sync_scanned": flags[4],
                "sync_success": flags[5],
                "attempts": 0,
                "lease_owner": lease,
                "lease_until": (now + timedelta(minutes=5)) if lease else None,
                "submitted_at": created,
                "success_time": created if status == "SUCCESS" else None,
                "created_at": created,
                "updated_at": updated or created,
            }
        )
        s.add("refund_order", fid, moves)

    def log(oid: int, names: tuple[str, ...], moves: bool, created=old) -> None:
        for name in names:
            events.append(
                (
                    {
                        "order_id": oid,
                        "event": name,
                        "detail": f"{name} of {oid}",
                        "created_at": created,
                        "updated_at": created,
                    },
                    moves,
                )
            )

    done = ("CANCELLED", "REFUND_SUBMITTED", "REFUND_SUCCEEDED", "STOCK_RESTORED", "SALES_DECREMENTED")
    for oid in range(1, finished_orders + 1):
        order(oid, stock_scanned=1, stock_success=1, sales_scanned=1, sales_success=1, wx_progress_scanned=1)
        request(oid, oid, (1, 1), True)
        refund(oid, oid, True)
        log(oid, done, True)
    n = finished_orders
    # an unpaid order cancelled: no refund at all; its request and events move
    order(n + 1, pay_status=0, transaction_id=None, refund_status="NONE", stock_scanned=1, stock_success=1)
    request(n + 1, n + 1, (1, 1), True)
    log(n + 1, ("PAYMENT_CLOSED", "CANCELLED", "STOCK_RESTORED"), True)
    # requests that stay: pending, rejected (the merchant's answer), old but changed recently
    order(n + 2, order_status="PAID", refund_status="NONE")
    request(n + 2, n + 2, (0, 0), False)
    request(n + 3, n + 1, (1, 0), False, code="ALREADY_CANCELLED")
    request(n + 4, n + 2, (1, 1), False, updated=young)
    # refunds that stay, and with them their orders' events (their requests were answered long ago: they move)
    closed, leased, polling, touched = n + 5, n + 6, n + 7, n + 8
    for oid in (closed, leased, polling, touched):
        order(oid)
        request(oid, oid, (1, 1), True)
    refund(closed, closed, False, flags=(1, 1, 1, 0, 1, 1), status="CLOSED")
    refund(n + 20, closed, False, seq=2)  # done, but its order has a CLOSED refund: reissue reads them together
    refund(leased, leased, False, lease="a-dead-daemon")
    refund(polling, polling, False, flags=(1, 1, 0, 0, 0, 0), status="PROCESSING")
    refund(touched, touched, False, updated=young)
    for oid in (closed, leased, polling, touched):
        log(oid, ("CANCELLED", "REFUND_SUBMITTED"), False)
    # young rows, last: a finished order of the last hour, and a young event of an old finished order
    fresh = n + 30
    order(fresh, created_at=young, updated_at=young)
    request(fresh, fresh, (1, 1), False, created=young)
    refund(fresh, fresh, False, created=young)
    log(fresh, done, False, created=young)
    log(1, ("PAYMENT_FOUND",), False, created=young)

    with db.begin() as conn:
        conn.execute(insert(models.goods), [{"id": 1, "name": "goods 1", "stock": 100, "sales": 50}])
        shapes: dict[tuple, list] = {}
        for row in orders:  # one INSERT per set of columns: the others keep their defaults
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        for rows in shapes.values():
            conn.execute(insert(models.goods_order2), rows)
        conn.execute(insert(models.req_order_ops), sorted(requests, key=lambda r: r["id"]))
        conn.execute(insert(models.refund_order), sorted(refunds, key=lambda r: r["id"]))
        conn.execute(insert(models.oplog), [{"id": i, **row} for i, (row, _moves) in enumerate(events, start=1)])
        for i, (_row, moves) in enumerate(events, start=1):
            s.add("goods_order2_oplog", i, moves)
    return s


def rows_of(db: Engine, table) -> dict[int, dict]:
    with db.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()}


def shop_bytes(db: Engine) -> list:
    """goods_order2 and goods as the driver returns them, unconverted: byte for byte."""
    with db.connect() as conn:
        return [list(conn.execute(text(f"SELECT * FROM {t} ORDER BY id")).all()) for t in ("goods_order2", "goods")]


def live_and_archived(db: Engine) -> dict[str, tuple[set[int], set[int]]]:
    return {t.name: (set(rows_of(db, t)), set(rows_of(db, models.ARCHIVES[t]))) for t in LIVE}


def assert_moved_whole(db: Engine, before: dict[str, dict[int, dict]], seeded: Seeded) -> None:
    """The archives hold exactly the rows that had to move, every column as it was; the live tables the rest."""
    now = db_now(db)
    for table in LIVE:
        live, archived = rows_of(db, table), rows_of(db, models.ARCHIVES[table])
        assert set(archived) == seeded.moves[table.name], table.name
        assert set(live) == seeded.stays[table.name], table.name
        for row_id, row in archived.items():
            stamp = row.pop("archived_at")
            assert row == before[table.name][row_id], (table.name, row_id)
            assert abs((now - stamp).total_seconds()) < 300
        for row_id, row in live.items():
            assert row == before[table.name][row_id], (table.name, row_id)


def snapshot(db: Engine) -> dict[str, dict[int, dict]]:
    return {t.name: rows_of(db, t) for t in LIVE}
