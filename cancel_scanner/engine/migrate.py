"""Bring any database to the schema of sql/schema.sql: create what is missing, add, never drop.

Why not Alembic: adopting a shop's database means the statements depend on what *that*
database already has (its goods_order2 has the shop's columns; ours are missing), so a DBA can
only review them after looking at it. ``migrate --sql`` does exactly that: it inspects, then
prints the statements it would run, each with what it locks. Alembic's offline SQL cannot
inspect, and its versioned scripts would each need the same "only if missing" logic anyway.

So the schema has one desired state, sql/schema.sql (the head), and a version, recorded by its
last statement in ``cancel_scanner_schema``. ``plan`` compares the database with it and lists
the steps: a missing table is created as schema.sql writes it; a missing column or index of an
existing table is added (one ALTER per table, online); an existing column whose type cannot
hold what the daemon writes refuses the whole plan before anything runs. Nothing is dropped,
renamed or rewritten. A database ahead of this code is refused (an older daemon must not
"repair" a newer schema).

On MariaDB/MySQL columns are added with ``ALGORITHM=INSTANT`` (metadata only) and indexes with
``ALGORITHM=INPLACE, LOCK=NONE`` (built while the shop reads and writes); when the server cannot,
the column step falls back to ``INPLACE, LOCK=NONE``, and never to a locking copy. Every ALTER
waits at most ``LOCK_WAIT_SECONDS`` for the table's metadata lock: an ALTER that queues behind
a long shop transaction would otherwise hold up every shop query queued behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, TextClause, inspect, text
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable, DefaultClause, MetaData

from cancel_scanner.engine.adopt import (
    SHOP_TABLES,
    _adopt_mysql,
    _backfills_again,
    _key_refusals,
    _refusals,
    _view_name,
    _views,
    our_collation,
)
from cancel_scanner.engine.db import is_mysql
from cancel_scanner.engine.errors import mysql_code
from cancel_scanner.engine.schema_file import head_version, schema_sql
from cancel_scanner.engine.schema_read import (
    SCHEMA_COLLATION,
    backfills,
    live_mysql,
    parse_schema,
    type_holds,  # noqa: F401 - migrate.type_holds: what a column's type holds, read by the tests too
)
from cancel_scanner.engine.schema_steps import Plan, SchemaRefused, Step

VERSION_TABLE = "cancel_scanner_schema"
LOCK_WAIT_SECONDS = 3  # per try, for the metadata lock of an ALTER
LOCK_TRIES = 5
_ONLINE_REFUSED = {1845, 1846}  # "ALGORITHM=... is not supported for this operation"
MIGRATE_WAIT_SECONDS = 300  # for another migrate of the same database to finish


def plan(engine: Engine, script: str | None = None, metadata: MetaData | None = None) -> Plan:
    """What it takes to bring ``engine``'s database to the head; raises SchemaRefused."""
    script = script or schema_sql()
    head = head_version(script)
    with engine.connect() as conn:
        current = current_version(conn)
        if current is not None and current > head:
            raise SchemaRefused(
                f"the database is at schema version {current}, newer than this cancel-scanner's {head}: upgrade cancel-scanner"
            )
        if is_mysql(engine):
            steps, notes = _plan_mysql(conn, script, behind=current is None or current < head)
        else:
            steps, notes = _plan_sqlite(conn, metadata, backfills(script), behind=current is None or current < head)
    if steps or current is None or current < head:
        steps.append(
            Step(
                f"record schema version {head}",
                f"INSERT {'IGNORE' if is_mysql(engine) else 'OR IGNORE'} INTO {VERSION_TABLE} (version, applied_by) VALUES ({head}, 'migrate')",
                "nothing (one row)",
            )
        )
    return Plan(
        engine.url.render_as_string(hide_password=True),
        current,
        head,
        steps,
        notes,
        LOCK_WAIT_SECONDS if is_mysql(engine) else None,
    )


def current_version(conn: Connection) -> int | None:
    if VERSION_TABLE not in inspect(conn).get_table_names():
        return None
    return conn.execute(text(f"SELECT MAX(version) FROM {VERSION_TABLE}")).scalar()


def _plan_mysql(conn: Connection, script: str, *, behind: bool = False) -> tuple[list[Step], list[str]]:
    """``behind``: the database records an older version (or none), so its views may be an older
    version's too: they are created again even when no table needs a step."""
    tables, others = parse_schema(script)
    live = live_mysql(conn)
    collation = our_collation(live)
    steps: list[Step] = []
    notes: list[str] = []
    refusals: list[str] = []
    for table in tables:
        have = live.get(table.name)
        if have is None:
            create = table.create.replace(f"COLLATE={SCHEMA_COLLATION}", f"COLLATE={collation}")
            steps.append(
                Step(
                    f"create table {table.name}"
                    + (f" ({collation}, as the shop's orders)" if collation != SCHEMA_COLLATION else ""),
                    create,
                    "nothing (a new table)",
                )
            )
            continue
        refusals += _refusals(table, have) + _key_refusals(conn, table, have)
        if table.name not in SHOP_TABLES and have.collation.startswith("utf8mb4") and have.collation != collation:
            # A table of ours in another collation than the shop's orders (an adoption that stopped at the
            # views): its strings compared with the shop's would fail (1267/1271). Ours to convert.
            steps.append(
                Step(
                    f"convert {table.name} (~{have.rows} rows) from {have.collation} to {collation}, as the shop's orders",
                    f"ALTER TABLE {table.name} CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}",
                    "the table (ours, not the shop's) while it is copied",
                )
            )
        steps += _adopt_mysql(table, have, notes, backfills(script), behind, collation)
    refusals += [
        f"{_view_name(v)} is a table; cancel-scanner needs that name for its view"
        for v in others
        if _view_name(v) in live
    ]
    if refusals:
        raise SchemaRefused("; ".join(refusals) + ". Nothing was changed.")
    if steps or behind or not all(_view_name(v) in _views(conn) for v in others):
        for stmt in others:
            steps.append(Step(f"(re)create view {_view_name(stmt)}", stmt, "nothing (a view: metadata only)"))
    return steps, notes


# The shop's own tables: adopted as they are, never converted.
def _plan_sqlite(
    conn: Connection, metadata: MetaData | None, fills: dict[tuple[str, str], str], behind: bool = False
) -> tuple[list[Step], list[str]]:
    """SQLite (the embedded default) from the models: types are not checked (SQLite has none to speak of)."""
    if metadata is None:
        raise ValueError("SQLite is migrated from the models: pass their metadata")
    insp = inspect(conn)
    present = set(insp.get_table_names())
    steps, refusals = [], []
    whole_file = "the database file, for the statement (SQLite has one writer)"
    for table in metadata.sorted_tables:
        if table.name not in present:
            steps.append(
                Step(
                    f"create table {table.name}", str(CreateTable(table).compile(conn)).strip(), "nothing (a new table)"
                )
            )
            steps += [Step(f"add index {i.name}", str(CreateIndex(i).compile(conn)), whole_file) for i in table.indexes]
            continue
        columns = {c["name"] for c in insp.get_columns(table.name)}
        steps += _backfills_again(table.name, columns, fills, behind)
        for column in (c for c in table.columns if c.name not in columns):
            # models/ gives server defaults as text() or a SQL function, both DefaultClause
            default = column.server_default.arg if isinstance(column.server_default, DefaultClause) else None
            if not column.nullable and (default is None or not isinstance(default, (str, TextClause))):
                # SQLite adds a column to a table only with a constant default (or NULL).
                refusals.append(
                    f"{table.name}.{column.name} is missing and SQLite cannot add it to an existing table"
                    " (NOT NULL with a computed default): add it by rebuilding the table, or use MariaDB"
                )
                continue
            ddl = str(CreateColumn(column).compile(conn))
            steps.append(
                Step(f"add column {table.name}.{column.name}", f"ALTER TABLE {table.name} ADD COLUMN {ddl}", whole_file)
            )
            if (table.name, column.name) in fills:
                steps.append(Step(f"backfill {table.name}.{column.name}", fills[(table.name, column.name)], whole_file))
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        steps += [
            Step(f"add index {i.name}", str(CreateIndex(i).compile(conn)), whole_file)
            for i in table.indexes
            if i.name not in indexes
        ]
    if refusals:
        raise SchemaRefused("; ".join(refusals) + ". Nothing was changed.")
    return steps, []


# --- running it ---------------------------------------------------------------------------------


class BackfillNotRun(Exception):
    """A column was added but its backfill failed; the version stays behind, so the next migrate runs it."""


class MigrationBusy(Exception):
    """Another migrate of the same database held it too long: nothing was run."""


@contextmanager
def exclusive(
    engine: Engine, wait_seconds: int = MIGRATE_WAIT_SECONDS, say: Callable[[str], None] = lambda line: None
) -> Iterator[None]:
    """One migrate of a database at a time (MySQL: a named lock for this database). Plan inside it:
    two that planned at once would both run the same ALTER, and the second fail on a duplicate
    column half-way, or run a backfill twice. The one that waited then finds nothing to do."""
    if not is_mysql(engine):
        yield  # SQLite: one writer already, and an embedded database has one operator
        return
    with engine.connect() as conn:
        name = f"cs_migrate.{conn.exec_driver_sql('SELECT DATABASE()').scalar()}"[:64]  # the server's names are global
        if not conn.execute(text("SELECT GET_LOCK(:name, 0)"), {"name": name}).scalar():
            say(f"-- another cancel-scanner migrate is running on this database: waiting (at most {wait_seconds} s)")
            if not conn.execute(text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": wait_seconds}).scalar():
                raise MigrationBusy(
                    f"another cancel-scanner migrate has been running on this database for over {wait_seconds} s;"
                    " nothing was run: let it finish, then run migrate again"
                )
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


def apply(
    engine: Engine,
    the_plan: Plan,
    say: Callable[[str], None] = lambda line: None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    lock_wait_seconds: int = LOCK_WAIT_SECONDS,
    tries: int = LOCK_TRIES,
) -> None:
    """Run the plan's steps in order, each in its own statement (DDL commits on MySQL anyway)."""
    with engine.connect() as conn:
        if is_mysql(engine):
            conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {int(lock_wait_seconds)}")
        for step in the_plan.steps:
            say(f"-- {step.what}; locks: {step.locks}")
            try:
                _run_step(conn, step, say, sleep, tries)
            except Exception as exc:
                if step.what.startswith("backfill "):  # its ALTER has committed: say what is left to do, in full
                    raise BackfillNotRun(
                        f"{step.what.split()[1]} was added but not backfilled ({_first_line(exc)}); the schema"
                        f" stays behind: fix the cause and run `cancel-scanner migrate` again (it runs: {step.sql})"
                    ) from exc
                raise
            conn.commit()


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:120]


def _run_step(
    conn: Connection, step: Step, say: Callable[[str], None], sleep: Callable[[float], None], tries: int
) -> None:
    sql = step.sql
    for attempt in range(1, tries + 1):
        try:
            conn.exec_driver_sql(sql)
            return
        except Exception as exc:
            conn.rollback()
            code = mysql_code(exc)
            if code in _ONLINE_REFUSED and step.fallback and sql != step.fallback:
                say(
                    "-- the server cannot do that instantly: INPLACE, LOCK=NONE instead (a rebuild; the shop still reads and writes)"
                )
                sql = step.fallback
                continue
            if code == 1205 and attempt < tries:  # another transaction holds the table: let the shop go first
                say(f"-- the table is in use by a long transaction; try {attempt + 1} of {tries} in {attempt} s")
                sleep(attempt)
                continue
            raise


def render(the_plan: Plan) -> Iterable[str]:
    """The plan as a DBA reads it: each statement, what it does and what it locks."""
    yield f"-- {the_plan.database}: schema version {the_plan.current if the_plan.current is not None else 'none'} -> {the_plan.head}"
    for note in the_plan.notes:
        yield f"-- note: {note}"
    if not the_plan.steps:
        yield "-- nothing to do"
    elif the_plan.lock_wait_seconds is not None:
        # Pasted into the mysql client without it, an ALTER behind a long shop transaction would wait
        # for hours (the server's default), and every shop query on that table behind the ALTER.
        yield (
            f"-- each statement waits at most {the_plan.lock_wait_seconds} s for its table's metadata lock;"
            " on 'Lock wait timeout exceeded', run it again later"
        )
        yield f"SET SESSION lock_wait_timeout = {the_plan.lock_wait_seconds};"
    for step in the_plan.steps:
        yield f"-- {step.what}; locks: {step.locks}"
        if step.fallback:
            yield "--   (if the server cannot: the same with ALGORITHM=INPLACE, LOCK=NONE)"
        yield step.sql.rstrip(";") + ";"


@dataclass(frozen=True)
class SchemaProblem:
    kind: str  # "empty" (none of the tables), "behind", "ahead"
    message: str

    def __str__(self) -> str:
        return self.message


def schema_problem(engine: Engine, tables: Iterable[str]) -> SchemaProblem | None:
    """Why this code must not run on the database's schema, or None when it is at head."""
    head = head_version()
    with engine.connect() as conn:
        current = current_version(conn)
        present = set(inspect(conn).get_table_names())
    if current is None:
        if not present & set(tables):
            return SchemaProblem(
                "empty",
                "no cancel-scanner schema: run `cancel-scanner initdb` (a new database)"
                " or `cancel-scanner migrate` (an existing one)",
            )
        return SchemaProblem(
            "behind", f"the schema has no version (this cancel-scanner needs {head}): run `cancel-scanner migrate`"
        )
    if current < head:
        return SchemaProblem(
            "behind",
            f"the schema is at version {current}, behind this cancel-scanner's {head}: run `cancel-scanner migrate`",
        )
    if current > head:
        return SchemaProblem(
            "ahead",
            f"the schema is at version {current}, ahead of this cancel-scanner's {head}: upgrade cancel-scanner",
        )
    return None
