"""Schema version 5: cancel_scanner_process.pace_group, the merchant whose WeChat QPS a process shares."""

from __future__ import annotations

from sqlalchemy import inspect

from testsupport.migrations import mark_schema_version, migrate_from


def test_a_version_4_database_gets_the_pace_group_column_from_migrate(db):
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE cancel_scanner_process DROP COLUMN pace_group")
        mark_schema_version(conn, 4)
    migrate_from(db, 4)
    assert "pace_group" in {c["name"] for c in inspect(db).get_columns("cancel_scanner_process")}
