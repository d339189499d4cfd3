"""Schema version 4: the tables of the operator's tools (reconciliation, prune's archives)."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate
from tests.flow import drop_index

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
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (3, 'test')")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (3, migrate.head_version())
    migrate.apply(db, the_plan)
    assert schema_problem(db) is None and migration_plan(db).steps == []
    assert set(V4_TABLES) <= set(inspect(db).get_table_names())
    archive = {c["name"] for c in inspect(db).get_columns("refund_order_archive")}
    live = {c["name"] for c in inspect(db).get_columns("refund_order")}
    assert archive == live | {"archived_at"}  # an archive holds every column of its live table
    assert "idx_refund_order_submitted_at" in {i["name"] for i in inspect(db).get_indexes("refund_order")}
