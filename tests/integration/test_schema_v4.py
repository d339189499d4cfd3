"""Schema version 4: the tables of the operator's tools (reconciliation, prune's archives)."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.flow import drop_index
from testsupport.migrations import mark_schema_version, migrate_from

V4_TABLES = (
    "reconcile_diff",
    "reconcile_run",
    "req_order_ops_archive",
    "refund_order_archive",
    "goods_order2_oplog_archive",
)


def test_a_version_3_database_gets_the_reconciliation_and_archive_tables_from_migrate(db):
    with db.begin() as conn:
        for table in V4_TABLES:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        drop_index(conn, "refund_order", "idx_refund_order_submitted_at")
        mark_schema_version(conn, 3)
    migrate_from(db, 3)
    assert set(V4_TABLES) <= set(inspect(db).get_table_names())
    archive = {c["name"] for c in inspect(db).get_columns("refund_order_archive")}
    live = {c["name"] for c in inspect(db).get_columns("refund_order")}
    assert archive == live | {"archived_at"}  # an archive holds every column of its live table
    assert "idx_refund_order_submitted_at" in {i["name"] for i in inspect(db).get_indexes("refund_order")}
