"""Rows in the state each stage expects, written fast: ``INSERT ... SELECT ... FROM seq_1_to_N``.

MariaDB's SEQUENCE engine makes the rows in the server: 100,000 take about a second,
1,000,000 about ten. Ids are the sequence numbers, so an order, its request and its refund
share one id; ``ready_for`` seeds what one database stage finds waiting for it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from bench.database import sql

DB_STAGES = ("intake", "sync_result", "restore_stock", "decrement_sales")
SEED_CHUNK_ROWS = 100_000
N_GOODS = 1_000

# Amounts vary per order, as in a real shop (1.00 .. 999.99 yuan, in fen).
AMOUNT_SQL = "(100 + (seq * 7919) % 99900)"
ORDER_NO_SQL = "CONCAT('SO', LPAD(seq, 12, '0'))"
TRANSACTION_ID_SQL = "CONCAT('4200', LPAD(seq, 24, '0'))"


def stages_option(p: argparse.ArgumentParser) -> None:
    """``--stages``: the database stages to measure, comma-separated (default: all of them)."""
    p.add_argument("--stages", default=",".join(DB_STAGES))


def chosen_stages(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The database stages ``--stages`` names, comma-separated; a name that is not one is a usage error."""
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(DB_STAGES)
    if unknown:
        p.error(f"not database stages: {', '.join(sorted(unknown))}")
    return stages


def _chunks(lo: int, hi: int, size: int = SEED_CHUNK_ROWS) -> Iterable[tuple[int, int]]:
    """(a, b) id ranges of at most ``size`` covering lo..hi: one INSERT each keeps a transaction's undo small."""
    a = lo
    while a <= hi:
        b = min(hi, a + size - 1)
        yield a, b
        a = b + 1


def goods(conn, n: int = N_GOODS, stock: int = 1_000_000_000, sales: int = 1_000_000_000) -> None:
    """Goods 1..n, with stock and sales no measurement can run out of."""
    for a, b in _chunks(1, n):
        sql(
            conn,
            f"INSERT INTO goods (id, name, stock, sales) SELECT seq, CONCAT('goods ', seq), {stock}, {sales} FROM seq_{a}_to_{b}",
        )


# goods_order2 by the state a stage leaves it in. Values: SQL expressions over `seq` (the id).
_ORDER_STATES: dict[str, dict[str, str]] = {
    # paid, never touched by the scanner: what intake expects
    "paid": {"order_status": "'PAID'"},
    # intake cancelled it and created a refund: what sync_result expects (with its refund polled)
    "refunding": {
        "order_status": "'CANCELLED'",
        "cancel_source": "'MERCHANT'",
        "refund_status": "'REFUNDING'",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
    # sync_result wrote SUCCESS: what restore_stock and decrement_sales expect
    "refunded": {
        "order_status": "'CANCELLED'",
        "cancel_source": "'MERCHANT'",
        "refund_status": "'REFUNDED'",
        "wx_progress_scanned": "1",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
        "refunded_at": "NOW(3) - INTERVAL 5 MINUTE",
    },
    # cancelled before it was paid: restore_stock gives the goods back, no refund, no sales
    "cancelled_unpaid": {
        "pay_status": "0",
        "transaction_id": "NULL",
        "paid_at": "NULL",
        "order_status": "'CANCELLED'",
        "cancel_source": "'MERCHANT'",
        "refund_status": "'NONE'",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
    # every stage done
    "finished": {
        "order_status": "'CANCELLED'",
        "cancel_source": "'MERCHANT'",
        "refund_status": "'REFUNDED'",
        "wx_progress_scanned": "1",
        "stock_scanned": "1",
        "stock_success": "1",
        "sales_scanned": "1",
        "sales_success": "1",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
        "refunded_at": "NOW(3) - INTERVAL 5 MINUTE",
    },
}


def orders(conn, lo: int, hi: int, state: str, n_goods: int = N_GOODS, goods_sql: str | None = None) -> None:
    """Orders ``lo..hi`` (id = seq) in ``state`` (paid unless the state says not); one goods line each,
    quantity 1..3, goods ``1 + seq % n_goods`` unless ``goods_sql`` (an SQL expression over seq) says."""
    columns = {
        "id": "seq",
        "order_no": ORDER_NO_SQL,
        "user_id": "1000 + seq % 5000",
        "merchant_id": "9",
        "goods_id": goods_sql or f"1 + seq % {n_goods}",
        "quantity": "1 + seq % 3",
        "total_amount": AMOUNT_SQL,
        "pay_status": "1",
        "transaction_id": TRANSACTION_ID_SQL,
        "paid_at": "NOW(3) - INTERVAL 1 DAY",
        **_ORDER_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO goods_order2 ({names}) SELECT {values} FROM seq_{a}_to_{b}")


_REQUEST_STATES = {
    "pending": {},
    "finished": {
        "scanned": "1",
        "success": "1",
        "result_code": "'OK'",
        "result_msg": f"CONCAT('cancelled; full refund of ', {AMOUNT_SQL}, ' fen started')",
        "scanned_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
}


def requests(conn, lo: int, hi: int, state: str, id_offset: int = 0) -> None:
    """A merchant's cancel request for each order ``lo..hi`` (request id = order id + id_offset)."""
    columns = {
        "id": f"seq + {id_offset}",
        "order_id": "seq",
        "op_type": "IF(seq % 4 = 0, 'USER_CANCEL', 'MERCHANT_CANCEL')",
        "operator": "CONCAT('clerk-', seq % 50)",
        "reason": "'out of stock'",
        **_REQUEST_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO req_order_ops ({names}) SELECT {values} FROM seq_{a}_to_{b}")


_ACCEPTED = {
    "submit_scanned": "1",
    "submit_success": "1",
    "wx_refund_id": "CONCAT('50', LPAD(seq, 30, '0'))",
    "submitted_at": "NOW(3) - INTERVAL 9 MINUTE",
}
_REFUND_STATES = {
    # intake wrote it: what submit_refund expects
    "submit": {"next_attempt_at": "NOW(3) - INTERVAL 1 SECOND"},
    # WeChat accepted it, first poll due: what poll_refund expects
    "poll": {**_ACCEPTED, "wx_status": "'PROCESSING'", "next_attempt_at": "NOW(3) - INTERVAL 1 SECOND"},
    # WeChat said SUCCESS: what sync_result expects
    "sync": {
        **_ACCEPTED,
        "wx_status": "'SUCCESS'",
        "progress_scanned": "1",
        "progress_success": "1",
        "success_time": "NOW(3) - INTERVAL 6 MINUTE",
    },
    "finished": {
        **_ACCEPTED,
        "wx_status": "'SUCCESS'",
        "progress_scanned": "1",
        "progress_success": "1",
        "sync_scanned": "1",
        "sync_success": "1",
        "success_time": "NOW(3) - INTERVAL 6 MINUTE",
    },
}


def refunds(conn, lo: int, hi: int, state: str) -> None:
    """The refund of each order ``lo..hi`` (refund id = order id = request id), as intake writes it."""
    columns = {
        "id": "seq",
        "order_id": "seq",
        "req_id": "seq",
        "refund_seq": "1",
        "out_refund_no": "CONCAT('CSR', seq, '-1')",
        "out_trade_no": ORDER_NO_SQL,
        "transaction_id": TRANSACTION_ID_SQL,
        "refund_amount": AMOUNT_SQL,
        "total_amount": AMOUNT_SQL,
        "reason": "'out of stock'",
        **_REFUND_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO refund_order ({names}) SELECT {values} FROM seq_{a}_to_{b}")


def oplog(conn, lo: int, hi: int, events: Sequence[str]) -> None:
    """Each of ``events`` once for every order lo..hi, as the stages that ran before wrote them."""
    for event in events:
        for a, b in _chunks(lo, hi):
            sql(
                conn,
                "INSERT INTO goods_order2_oplog (order_id, event, detail) "
                f"SELECT seq, '{event}', CONCAT('seeded ', seq) FROM seq_{a}_to_{b}",
            )


def analyze(conn) -> None:
    """Fresh index statistics, so plans do not depend on when the background recalculation ran."""
    for table in ("goods", "goods_order2", "req_order_ops", "refund_order", "goods_order2_oplog"):
        sql(conn, f"ANALYZE TABLE {table}")


def ready_for(conn, stage: str, n: int) -> None:
    """N rows exactly as the previous stage leaves them for ``stage`` (one of DB_STAGES), statistics fresh."""
    if stage == "intake":
        orders(conn, 1, n, "paid")
        requests(conn, 1, n, "pending")
    elif stage == "sync_result":
        orders(conn, 1, n, "refunding")
        requests(conn, 1, n, "finished")
        refunds(conn, 1, n, "sync")
        oplog(conn, 1, n, ("CANCELLED", "REFUND_SUBMITTED"))
    else:  # restore_stock, decrement_sales: sync_result wrote REFUNDED
        goods(conn)
        orders(conn, 1, n, "refunded")
        requests(conn, 1, n, "finished")
        refunds(conn, 1, n, "finished")
        oplog(conn, 1, n, ("CANCELLED", "REFUND_SUBMITTED", "REFUND_SUCCEEDED"))
    analyze(conn)
