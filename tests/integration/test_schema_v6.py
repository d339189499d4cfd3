"""Schema version 6: channel_fact (what a payment channel did for a row whose write-back here failed), and
the process registry's pace_limits (the limits each process of a merchant was configured with)."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate


def test_a_version_5_database_gets_the_channel_fact_table_from_migrate_and_refuses_to_run_before(db):
    with db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE channel_fact")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (5, 'test')")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (5, migrate.head_version()) and the_plan.head >= 6
    migrate.apply(db, the_plan)

    assert schema_problem(db) is None and migration_plan(db).steps == []
    indexes = {i["name"] for i in inspect(db).get_indexes("channel_fact")}
    assert "idx_channel_fact_open" in indexes
    assert {"stage", "row_id", "fact", "number", "reason", "resolved_at"} <= {
        c["name"] for c in inspect(db).get_columns("channel_fact")
    }


def test_a_version_5_process_registry_gets_its_pace_limits_column_from_migrate(db):
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE cancel_scanner_process DROP COLUMN pace_limits")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (5, 'test')")
    migrate.apply(db, migration_plan(db))
    assert schema_problem(db) is None
    assert "pace_limits" in {c["name"] for c in inspect(db).get_columns("cancel_scanner_process")}
