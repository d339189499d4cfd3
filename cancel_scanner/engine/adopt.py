"""Adopting a shop's MySQL tables: what migrate may add to them, what it refuses, in whose collation.

The rules for tables that are not ours alone (goods, goods_order2): our columns and keys are added
online with their defaults, a column we read or write too narrow for what we write is refused by
name, and the strings we add take the shop's collation (``our_collation``).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, inspect

from cancel_scanner.engine.schema_read import SCHEMA_COLLATION, ColumnSpec, KeySpec, LiveTable, TableSpec, type_holds
from cancel_scanner.engine.schema_steps import Step

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
