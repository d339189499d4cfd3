"""A database taken back to an earlier schema version, and migrate bringing it to head."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate


def mark_schema_version(conn: Any, version: int) -> None:
    """The schema table says ``version``, as a database of that version would (the tables are the caller's)."""
    conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
    conn.exec_driver_sql(f"INSERT INTO cancel_scanner_schema (version, applied_by) VALUES ({int(version)}, 'test')")


def migrate_from(db: Engine, version: int) -> migrate.Plan:
    """Migrates a database at ``version``: refused as behind before, planned from ``version`` to head,
    and nothing left to do after. Returns the plan it applied."""
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (version, migrate.head_version())
    migrate.apply(db, the_plan)

    assert schema_problem(db) is None and migration_plan(db).steps == []
    return the_plan
