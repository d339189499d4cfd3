"""Schema version 6: channel_fact (what a payment channel did for a row whose write-back here failed), and
the process registry's pace_limits (the limits each process of a merchant was configured with)."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate
from testsupport.migrations import mark_schema_version, migrate_from


def test_a_version_5_database_gets_the_channel_fact_table_from_migrate_and_refuses_to_run_before(db):
    with db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE channel_fact")
        mark_schema_version(conn, 5)
    assert migrate_from(db, 5).head >= 6
    indexes = {i["name"] for i in inspect(db).get_indexes("channel_fact")}
    assert "idx_channel_fact_open" in indexes
    assert {"stage", "row_id", "fact", "number", "reason", "resolved_at"} <= {
        c["name"] for c in inspect(db).get_columns("channel_fact")
    }


def test_a_version_5_process_registry_gets_its_pace_limits_column_from_migrate(db):
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE cancel_scanner_process DROP COLUMN pace_limits")
        mark_schema_version(conn, 5)
    migrate.apply(db, migration_plan(db))
    assert schema_problem(db) is None
    assert "pace_limits" in {c["name"] for c in inspect(db).get_columns("cancel_scanner_process")}
