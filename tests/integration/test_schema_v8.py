"""Schema version 8 (partial cancels): a version-7 database with finished whole-order cancels is
migrated, keeps them as they were, and then takes partial cancels."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.flow import add_goods, add_order, request_cancel, row, rows
from testsupport.migrations import mark_schema_version, migrate_from

FLAG_AND_RETRY = ("scanned", "success", "attempts", "next_attempt_at", "last_error")  # part_goods' own

REFUND_V8 = ("quantity", "part", "applied_at", *(f"goods_{c}" for c in FLAG_AND_RETRY))
V8_COLUMNS = {
    "req_order_ops": ("quantity",),
    "req_order_ops_archive": ("quantity",),
    "goods_order2": ("cancelled_quantity", "parts_quantity", "refunded_amount", "refund_turn_at"),
    "refund_order": REFUND_V8,
    "refund_order_archive": REFUND_V8,
}
FINISHED = (
    "SELECT o.id, o.order_status, o.refund_status, o.stock_scanned, o.stock_success, o.sales_scanned,"
    " o.sales_success, r.out_refund_no, r.refund_amount, r.wx_status, r.sync_success"
    " FROM goods_order2 o JOIN refund_order r ON r.order_id = o.id ORDER BY o.id"
)


def back_to_version_7(db) -> None:
    with db.begin() as conn:
        conn.exec_driver_sql("DROP VIEW IF EXISTS v_cancel_scanner_failed")  # it reads part_goods' columns
        on = db.dialect.name in ("mysql", "mariadb")
        conn.exec_driver_sql("DROP INDEX idx_refund_order_goods_pending" + (" ON refund_order" if on else ""))
        conn.exec_driver_sql("DROP INDEX idx_goods_order2_ship_due" + (" ON goods_order2" if on else ""))
        for table, columns in V8_COLUMNS.items():
            for column in columns:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        mark_schema_version(conn, 7)


def test_finished_whole_cancels_survive_the_migration_and_the_database_then_takes_partial_cancels(world):
    db = world.db
    add_goods(db, 1, stock=10, sales=5)
    for order_id in (1, 2):
        add_order(db, order_id, goods_id=1, quantity=2, amount=1280)
        request_cancel(db, order_id)
    world.settle()
    before = rows(db, FINISHED)
    goods_before = row(db, "goods", 1)

    back_to_version_7(db)
    migrate_from(db, 7)

    for table, columns in V8_COLUMNS.items():
        assert set(columns) <= {c["name"] for c in inspect(db).get_columns(table)}, table
    assert rows(db, FINISHED) == before  # every finished cancel as it was
    assert (row(db, "goods", 1)["stock"], row(db, "goods", 1)["sales"]) == (
        goods_before["stock"],
        goods_before["sales"],
    )
    assert [r["cancelled_quantity"] for r in rows(db, "SELECT cancelled_quantity FROM goods_order2")] == [0, 0]

    add_order(db, 3, goods_id=1, quantity=3, amount=900)
    req = request_cancel(db, 3, quantity=1)
    world.settle()
    assert row(db, "req_order_ops", req)["result_code"] == "OK"
    order = row(db, "goods_order2", 3)
    assert (order["order_status"], order["cancelled_quantity"], order["refunded_amount"]) == ("PAID", 1, 300)
    assert (row(db, "goods", 1)["stock"], row(db, "goods", 1)["sales"]) == (
        goods_before["stock"] + 1,
        goods_before["sales"] - 1,
    )
    if db.dialect.name in ("mysql", "mariadb"):  # the view, created again by migrate, reads the new columns
        assert rows(db, "SELECT COUNT(*) AS n FROM v_cancel_scanner_failed")[0]["n"] == 0
