"""Schema version 5: cancel_scanner_process.pace_group, the merchant whose WeChat QPS a process shares."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate


def test_a_version_4_database_gets_the_pace_group_column_from_migrate(db):
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE cancel_scanner_process DROP COLUMN pace_group")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (4, 'test')")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (4, migrate.head_version())
    migrate.apply(db, the_plan)

    assert schema_problem(db) is None and migration_plan(db).steps == []
    assert "pace_group" in {c["name"] for c in inspect(db).get_columns("cancel_scanner_process")}
