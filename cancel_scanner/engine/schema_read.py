"""Reading a schema two ways: the DDL script (what sql/schema.sql asks for) and a live MySQL/MariaDB
database (what is there), and the rule for whether a column found can hold what a column asked for does.

Plain reading, no decisions: engine.migrate compares the two and plans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import Connection, text

from cancel_scanner.engine.schema_file import split_sql

SCHEMA_COLLATION = "utf8mb4_unicode_ci"  # what sql/schema.sql writes for our tables

# --- what sql/schema.sql asks for ---------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    definition: str  # everything after the name, as schema.sql writes it

    @property
    def type(self) -> str:
        found = re.match(r"[A-Z]+(?:\(\d+(?:,\d+)?\))?(?: UNSIGNED)?", self.definition)
        assert found is not None, self.definition  # schema.sql's own text: every definition opens with its type
        return found.group(0)

    @property
    def _attributes(self) -> str:
        """The definition before its COMMENT: a comment's words ("NOT NULL", "DEFAULT") are not the column's."""
        return self.definition.split(" COMMENT ", 1)[0]

    @property
    def not_null(self) -> bool:
        return "NOT NULL" in self._attributes

    @property
    def needs_value(self) -> bool:
        """NOT NULL without a default: an existing row has nothing to put there."""
        d = self._attributes
        return self.not_null and "DEFAULT" not in d and "AUTO_INCREMENT" not in d

    @property
    def is_string(self) -> bool:
        return self.type.split("(")[0].lower() in _STRINGS

    def in_utf8mb4(self, collation: str = SCHEMA_COLLATION) -> str:
        """The definition with utf8mb4 said: added to a shop's latin1 (or utf8mb3) table, a column would
        otherwise take the table's charset, and a WeChat message in Chinese could not be written to it."""
        return f"{self.type} CHARACTER SET utf8mb4 COLLATE {collation}{self.definition[len(self.type) :]}"


@dataclass(frozen=True)
class KeySpec:
    name: str
    kind: str  # primary | unique | index | check
    columns: tuple[str, ...]
    definition: str  # as it follows ADD in an ALTER TABLE


@dataclass(frozen=True)
class TableSpec:
    name: str
    create: str
    columns: tuple[ColumnSpec, ...]
    keys: tuple[KeySpec, ...]


_BACKFILL = re.compile(r"^\s*-- backfill (\w+)\.(\w+): (UPDATE .+)$", re.M)


def backfills(script: str) -> dict[tuple[str, str], str]:
    """(table, column) -> the UPDATE that gives existing rows the value the column means for them."""
    return {(t, c): sql.rstrip(";") for t, c, sql in _BACKFILL.findall(script)}


def _without_comment(line: str) -> str:
    """The line without a trailing ``-- comment`` (outside quotes: a COMMENT '... -- ...' stays): in the
    one-line ALTER migrate builds, a comment left in would swallow the rest of the statement."""
    quoted = False
    for i, char in enumerate(line):
        if char == "'":
            quoted = not quoted  # '' (an escaped quote) toggles twice
        elif not quoted and line.startswith("--", i) and line[i + 2 : i + 3] in ("", " ", "\t"):
            return line[:i].rstrip()
    return line


_KEY = re.compile(r"(?:CONSTRAINT (\w+) )?(PRIMARY KEY|UNIQUE KEY|INDEX|KEY|CHECK)\s*(\w+)?\s*\((.*)\)$")


def parse_schema(script: str) -> tuple[list[TableSpec], list[str]]:
    """The tables of a schema script (one column or key per line, as sql/schema.sql is written),
    and its other statements (views), in order."""
    tables, others = [], []
    for stmt in split_sql(script):
        head = re.match(r"CREATE TABLE IF NOT EXISTS (\w+) \(", stmt)
        if head is None:
            if not stmt.startswith("INSERT IGNORE INTO cancel_scanner_schema"):
                others.append(stmt)
            continue
        end = re.search(r"\n\)", stmt)  # the column list ends at a line opening with ")"
        assert end is not None, stmt  # schema.sql's own text
        body = stmt[head.end() : end.start()]
        columns, keys = [], []
        for line in (_without_comment(raw.strip()).rstrip(",") for raw in body.splitlines()):
            if not line or line.startswith("--"):
                continue
            key = _KEY.match(line)
            if key:
                constraint, kind, index_name, inside = key.groups()
                kind = {"PRIMARY KEY": "primary", "UNIQUE KEY": "unique", "CHECK": "check"}.get(kind, "index")
                cols = () if kind == "check" else tuple(c.strip() for c in inside.split(","))
                keys.append(KeySpec(constraint or index_name, kind, cols, line))
            else:
                name, _, definition = line.partition(" ")
                columns.append(ColumnSpec(name, definition.strip()))
        tables.append(TableSpec(head.group(1), stmt, tuple(columns), tuple(keys)))
    return tables, others


# --- what the database has ----------------------------------------------------------------------


@dataclass
class LiveTable:
    columns: dict[str, str] = field(default_factory=dict)  # name -> COLUMN_TYPE (lower case)
    indexes: dict[str, tuple[tuple[str, ...], bool]] = field(default_factory=dict)  # name -> (columns, unique)
    checks: set[str] = field(default_factory=set)
    rows: int = 0  # the optimizer's estimate, for the plan's words only
    nullable: set[str] = field(default_factory=set)
    octets: dict[str, int] = field(default_factory=dict)  # name -> bytes in an index (strings: CHARACTER_OCTET_LENGTH)
    collation: str = ""
    row_format: str = ""


def live_mysql(conn: Connection) -> dict[str, LiveTable]:
    live: dict[str, LiveTable] = {}
    for name, rows, collation, row_format in conn.execute(
        text(
            "SELECT TABLE_NAME, COALESCE(TABLE_ROWS, 0), COALESCE(TABLE_COLLATION, ''), COALESCE(ROW_FORMAT, '')"
            " FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'"
        )
    ):
        live[name] = LiveTable(rows=int(rows), collation=collation.lower(), row_format=row_format.lower())
    for table, column, column_type, nullable, octets in conn.execute(
        text(
            "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, CHARACTER_OCTET_LENGTH FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, ORDINAL_POSITION"
        )
    ):
        if table in live:
            live[table].columns[column] = column_type.lower()
            live[table].octets[column] = int(octets) if octets is not None else 8
            if nullable == "YES":
                live[table].nullable.add(column)
    for table, index, column, non_unique in conn.execute(
        text(
            "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, NON_UNIQUE FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"
        )
    ):
        if table in live:
            cols, _ = live[table].indexes.get(index, ((), False))
            live[table].indexes[index] = ((*cols, column), not int(non_unique))
    for table, check in conn.execute(
        text(
            "SELECT TABLE_NAME, CONSTRAINT_NAME FROM information_schema.TABLE_CONSTRAINTS"
            " WHERE TABLE_SCHEMA = DATABASE() AND CONSTRAINT_TYPE = 'CHECK'"
        )
    ):
        if table in live:
            live[table].checks.add(check)
    return live


_INTEGERS = {"tinyint": 1, "smallint": 2, "mediumint": 3, "int": 4, "integer": 4, "bigint": 8}
_TIMES = {"datetime", "timestamp"}
_STRINGS = {"varchar": None, "char": None, "text": 65535, "mediumtext": 2**24 - 1, "longtext": 2**32 - 1}


def type_holds(found: str, wanted: str) -> bool:
    """Can a column of type ``found`` (the server's COLUMN_TYPE) hold every value the daemon
    writes to one declared ``wanted`` (schema.sql's type)? Wider is fine; narrower or another
    kind of value is not."""
    f = re.match(r"(\w+)(?:\((\d+)(?:,\d+)?\))?( unsigned)?", found.lower())
    w = re.match(r"(\w+)(?:\((\d+)(?:,\d+)?\))?( unsigned)?", wanted.lower())
    assert f is not None and w is not None, (found, wanted)  # every COLUMN_TYPE opens with a word
    f_base, f_len, f_unsigned = f.group(1), f.group(2), bool(f.group(3))
    w_base, w_len, w_unsigned = w.group(1), w.group(2), bool(w.group(3))
    if w_base in _INTEGERS:
        if f_base not in _INTEGERS:
            return False
        f_size, w_size = _INTEGERS[f_base], _INTEGERS[w_base]
        if w_unsigned and not f_unsigned:
            return f_size > w_size  # a signed type holds an unsigned one only if it is wider
        return f_size >= w_size
    if w_base in _TIMES:
        return f_base in _TIMES
    if w_base in ("varchar", "char"):
        if f_base in ("varchar", "char"):
            return int(f_len or 1) >= int(w_len or 1)
        return f_base in _STRINGS
    return f_base == w_base
