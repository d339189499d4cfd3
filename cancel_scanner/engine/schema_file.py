"""sql/schema.sql as the code reads it: its text, its statements, the version it records.

Packaged as engine/data/schema.sql (a link to sql/schema.sql in the repository). Imports nothing of
the engine, so db, migrate and schema_read all read it without importing each other.
"""

from __future__ import annotations

import re
from importlib import resources

_VERSION_INSERT = re.compile(
    r"INSERT IGNORE INTO cancel_scanner_schema \(version, applied_by\) VALUES \((\d+), 'schema.sql'\)"
)


def schema_sql() -> str:
    """The text of sql/schema.sql."""
    return resources.files("cancel_scanner.engine").joinpath("data/schema.sql").read_text(encoding="utf-8")


def split_sql(script: str) -> list[str]:
    """Statements of a plain DDL script: no procedures, so ';' at a line end ends one."""
    body = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def head_version(script: str | None = None) -> int:
    """The schema version sql/schema.sql records (its last statement)."""
    found = _VERSION_INSERT.search(script or schema_sql())
    if found is None:
        raise RuntimeError("sql/schema.sql records no schema version")
    return int(found.group(1))
