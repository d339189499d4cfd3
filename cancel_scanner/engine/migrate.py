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

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, TextClause, inspect, text
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable, DefaultClause, MetaData

from cancel_scanner.engine.db import is_mysql
from cancel_scanner.engine.errors import mysql_code
from cancel_scanner.engine.schema_file import head_version, schema_sql
from cancel_scanner.engine.schema_read import (
    SCHEMA_COLLATION,
    ColumnSpec,
    KeySpec,
    LiveTable,
    TableSpec,
    backfills,
    live_mysql,
    parse_schema,
    type_holds,
)

VERSION_TABLE = "cancel_scanner_schema"
LOCK_WAIT_SECONDS = 3  # per try, for the metadata lock of an ALTER
LOCK_TRIES = 5
_ONLINE_REFUSED = {1845, 1846}  # "ALGORITHM=... is not supported for this operation"
MIGRATE_WAIT_SECONDS = 300  # for another migrate of the same database to finish


class SchemaRefused(Exception):
    """The database cannot be brought to the head without changing what is there: nothing was run."""


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    what: str
    sql: str
    locks: str
    fallback: str | None = None  # run instead when the server cannot do ``sql`` online


@dataclass
class Plan:
    database: str
    current: int | None  # None: no version recorded
    head: int
    steps: list[Step]
    notes: list[str]
    lock_wait_seconds: int | None = (
        None  # MySQL: what each DDL waits for its metadata lock (the session's first statement)
    )

    @property
    def behind(self) -> bool:
        return bool(self.steps) or self.current is None or self.current < self.head


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
SHOP_TABLES = frozenset({"goods", "goods_order2"})


def our_collation(live: dict[str, LiveTable]) -> str:
    """The one rule for collations: our tables and our string columns take the collation of the shop's
    goods_order2, said over utf8mb4 (a legacy utf8/utf8mb3 shop's utf8mb3_general_ci gives
    utf8mb4_general_ci: the same rules, and every character), so that any comparison of a shop string
    with ours (a join on order_no, a UNION in a view, a reconcile match) compares like with like.
    Without the shop's table (a fresh database), or in a charset utf8mb4 cannot stand for, schema.sql's."""
    shop = live.get("goods_order2")
    charset, _, rules = (shop.collation if shop else "").partition("_")
    if charset == "utf8mb4" and rules:
        return f"utf8mb4_{rules}"
    if charset in ("utf8", "utf8mb3") and rules:
        return f"utf8mb4_{rules}"
    return SCHEMA_COLLATION


# The shop's columns the daemon neither reads nor writes (the contract names them; the shop's tools
# fill them): whatever type and length the shop gave them is adopted as it is.
UNTOUCHED_SHOP_COLUMNS = {"goods": frozenset({"name"}), "goods_order2": frozenset({"user_id", "merchant_id"})}


def _refusals(table: TableSpec, have: LiveTable) -> list[str]:
    out = []
    untouched = UNTOUCHED_SHOP_COLUMNS.get(table.name, frozenset())
    for column in table.columns:
        found = have.columns.get(column.name)
        if found is None:
            if column.needs_value:
                out.append(
                    f"{table.name}.{column.name} is missing and has no default ({column.type} NOT NULL):"
                    " add it with the shop's values first"
                )
        elif column.name in untouched:
            continue  # the shop's to type as it likes: nothing of ours reads or writes it
        elif not type_holds(found, column.type):
            out.append(
                f"{table.name}.{column.name} is {found}; cancel-scanner reads or writes {column.type} there"
                " and needs it (or wider)"
            )
        elif column.not_null and column.name in have.nullable:
            # The polls compare these columns (is_deleted = 0, order_status = 'CANCELLED'): a NULL there
            # hides the row from them for good, and no error ever says so.
            out.append(
                f"{table.name}.{column.name} allows NULL; cancel-scanner needs it NOT NULL (a row with NULL there"
                " is never scanned): set its NULLs and make it NOT NULL first"
            )
    primary = next((k for k in table.keys if k.kind == "primary"), None)
    if primary is not None and have.indexes.get("PRIMARY", ((), True))[0] != primary.columns:
        out.append(f"{table.name} needs PRIMARY KEY ({', '.join(primary.columns)})")
    return out


MAX_KEY_BYTES = 3072  # InnoDB's limit for one index (DYNAMIC, COMPRESSED)
MAX_KEY_PART_BYTES_COMPACT = 767  # for one column of it in a COMPACT or REDUNDANT table


def _keys_to_add(table: TableSpec, have: LiveTable) -> list[KeySpec]:
    """Our unique keys and indexes the table lacks. An index of the shop's on the same columns serves
    (whatever its name); for a unique key only a unique one does, or duplicates would go unrefused."""
    present = set(have.indexes.values())
    out = []
    for key in (k for k in table.keys if k.kind in ("unique", "index")):
        if key.name in have.indexes or (key.columns, True) in present:
            continue
        if key.kind == "index" and (key.columns, False) in present:
            continue
        out.append(key)
    return out


def _key_refusals(conn: Connection, table: TableSpec, have: LiveTable) -> list[str]:
    """What would make an index step fail half-way, after the columns were added: a unique key whose
    name the shop took, duplicates it would refuse, a shop column too long (or TEXT) to index."""
    out = []
    for key in (k for k in table.keys if k.kind == "unique" and k.name in have.indexes):
        if have.indexes[key.name] != (key.columns, True):
            cols, unique = have.indexes[key.name]
            out.append(
                f"{table.name}.{key.name} is {'a unique key' if unique else 'an index'} on ({', '.join(cols)});"
                f" cancel-scanner needs it UNIQUE on ({', '.join(key.columns)})"
            )
    ours = {c.name: c for c in table.columns}
    limit = MAX_KEY_PART_BYTES_COMPACT if have.row_format in ("compact", "redundant") else MAX_KEY_BYTES
    for key in _keys_to_add(table, have):
        octets = {c: have.octets[c] if c in have.octets else _octets(ours[c]) for c in key.columns}
        wide = [c for c in key.columns if octets[c] > limit]
        if wide or sum(octets.values()) > MAX_KEY_BYTES:
            shown = ", ".join(f"{c} {have.columns.get(c, ours[c].type)}" for c in (wide or key.columns))
            out.append(
                f"{table.name}: index {key.name} cannot be built on {shown} (over InnoDB's"
                f" {limit if wide else MAX_KEY_BYTES} bytes a key): make the column(s) shorter first"
            )
            continue
        duplicate = (
            _a_duplicate(conn, table.name, key.columns)
            if key.kind == "unique" and set(key.columns) <= set(have.columns)
            else None
        )
        if duplicate is not None:
            out.append(
                f"{table.name} has rows with the same ({', '.join(key.columns)}), e.g. {duplicate};"
                " cancel-scanner needs it unique"
            )
    return out


def _octets(column: ColumnSpec) -> int:
    """Bytes of one of our columns in an index (utf8mb4: 4 a character)."""
    length = re.search(r"\((\d+)\)", column.type)
    return 4 * int(length.group(1)) if column.is_string and length else 8


def _a_duplicate(conn: Connection, table: str, columns: tuple[str, ...]) -> str | None:
    cols = ", ".join(columns)
    row = conn.exec_driver_sql(f"SELECT {cols} FROM {table} GROUP BY {cols} HAVING COUNT(*) > 1 LIMIT 1").first()
    return None if row is None else ", ".join(repr(v) for v in row)


def _adopt_mysql(
    table: TableSpec,
    have: LiveTable,
    notes: list[str],
    fills: dict[tuple[str, str], str],
    behind: bool = False,
    collation: str = SCHEMA_COLLATION,
) -> list[Step]:
    steps = _backfills_again(table.name, set(have.columns), fills, behind)
    missing = [c for c in table.columns if c.name not in have.columns]
    if missing:
        # A string column of ours said in utf8mb4 and the one collation wherever the table's own is another.
        differs = have.collation != collation
        adds = ", ".join(
            f"ADD COLUMN {c.name} {c.in_utf8mb4(collation) if differs and c.is_string else c.definition}"
            for c in missing
        )
        steps.append(
            Step(
                f"add {len(missing)} column(s) to {table.name} (~{have.rows} rows): {', '.join(c.name for c in missing)}",
                f"ALTER TABLE {table.name} {adds}, ALGORITHM=INSTANT",
                "nothing: metadata only (INSTANT); the shop reads and writes on",
                fallback=f"ALTER TABLE {table.name} {adds}, ALGORITHM=INPLACE, LOCK=NONE",
            )
        )
        for column in missing:
            if (table.name, column.name) in fills:
                steps.append(
                    Step(
                        f"backfill {table.name}.{column.name} for the rows that were there before",
                        fills[(table.name, column.name)],
                        "the rows it updates, until it commits",
                    )
                )
    for key in table.keys:
        if key.kind == "index" and key.name in have.indexes and have.indexes[key.name][0] != key.columns:
            notes.append(
                f"{table.name}: index {key.name} exists on ({', '.join(have.indexes[key.name][0])}),"
                f" not ({', '.join(key.columns)}); left as it is, the polls may be slower"
            )
    keys = _keys_to_add(table, have)
    if keys:
        steps.append(
            Step(
                f"add {len(keys)} index(es) to {table.name}: {', '.join(k.name for k in keys)}",
                f"ALTER TABLE {table.name} "
                + ", ".join(f"ADD {k.definition}" for k in keys)
                + ", ALGORITHM=INPLACE, LOCK=NONE",
                "no row locks: built online (INPLACE, LOCK=NONE) while the shop reads and writes; a brief metadata lock at its start and end",
            )
        )
    for check in (k for k in table.keys if k.kind == "check"):
        if check.name not in have.checks:
            notes.append(
                f"{table.name}: CHECK {check.name} not added to an existing table (it would copy the table);"
                " the UNSIGNED columns refuse negative values anyway"
            )
    return steps


def _view_name(stmt: str) -> str:
    name = re.search(r"VIEW (\w+)", stmt)
    assert name is not None, stmt  # called on schema.sql's CREATE ... VIEW statements only
    return name.group(1)


def _views(conn: Connection) -> set[str]:
    return set(inspect(conn).get_view_names())


def _backfills_again(table: str, present: set[str], fills: dict[tuple[str, str], str], behind: bool) -> list[Step]:
    """The backfills of columns already there, while the database is behind: the column may have
    been added by a migrate whose backfill failed (the version is recorded only at the end). A
    backfill is written to be safe twice, so running it again costs one UPDATE of the rows it means."""
    if not behind:
        return []
    return [
        Step(
            f"backfill {t}.{c} again (the database is behind: a migrate may have stopped before it)",
            sql,
            "the rows it updates, until it commits",
        )
        for (t, c), sql in fills.items()
        if t == table and c in present
    ]


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
