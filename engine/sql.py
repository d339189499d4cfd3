"""Set-based SQL helpers the stages share: row locks that suit the dialect, and the oplog."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

from sqlalchemy import Column, Connection, Select, case, insert, literal, select, update

from engine.outcome import Contended, clip
from models import goods, oplog


def locked(conn: Connection, query: Select, *, skip_locked: bool = False) -> Select:
    """``query`` FOR UPDATE on MySQL/MariaDB. SQLite has one writer, which already holds the lock."""
    if conn.dialect.name in ("mysql", "mariadb"):
        return query.with_for_update(skip_locked=skip_locked)
    return query


def write_oplog(conn: Connection, events: Iterable[tuple[int, str, str | None]]) -> int:
    """One multi-row INSERT. The unique key (order_id, event) makes a second write of an event fail."""
    rows = [{"order_id": order_id, "event": event, "detail": clip(detail) if detail else None} for order_id, event, detail in events]
    if rows:
        conn.execute(insert(oplog), rows)
    return len(rows)


def by_id(id_column: Column, values: Mapping[int, object], else_=None):
    """``CASE id WHEN .. THEN .. END``: one UPDATE writes a different value per row.

    SQLAlchemy caches one compiled statement per shape, and every count of WHENs is a new
    shape (about 2 KB per WHEN): batches of every size from 1 to 500 would grow a long-running
    daemon by hundreds of MB. So the WHENs are padded to the next power of two by repeating
    the last one (the first match wins, so a repeat changes nothing): at most ten shapes.
    """
    whens = list(values.items())
    if whens:
        whens += [whens[-1]] * (_bucket(len(whens)) - len(whens))
    return case(*whens, value=id_column, else_=else_)


def _bucket(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


def update_rows(conn: Connection, table, rows: Mapping[int, Mapping[str, Any]], *where) -> int:
    """One UPDATE that gives each row (by id) its own values; returns the rows matched.

    A column with one value for all rows is a plain SET; a column whose value differs is
    written with ``CASE id WHEN .. THEN .. END``. Every row must name the same columns.
    """
    if not rows:
        return 0
    first = next(iter(rows.values()))
    values: dict[str, Any] = {}
    for name in first:
        column = table.c[name]
        distinct = {row[name] for row in rows.values()}
        if len(distinct) == 1:
            values[name] = distinct.pop()
        else:
            values[name] = by_id(table.c.id, {rid: literal(row[name], column.type) for rid, row in rows.items()})
    return conn.execute(update(table).where(table.c.id.in_(list(rows)), *where).values(values)).rowcount


def read_goods(conn: Connection, goods_ids: Iterable[int], column: Column) -> dict[int, int]:
    """Current ``column`` (stock or sales) of these goods, read without a lock (the decisions of ``process``)."""
    return dict(conn.execute(select(goods.c.id, column).where(goods.c.id.in_(sorted(set(goods_ids))))).all())


def lock_goods(conn: Connection, goods_ids: Iterable[int], column: Column) -> tuple[dict[int, int], set[int]]:
    """Current ``column`` of the goods we could lock now, and the ids someone else holds.

    SKIP LOCKED: a goods row the shop holds (a checkout, a long admin transaction) delays only
    the orders of that goods, never the batch. Always in id order: restore_stock and
    decrement_sales both lock goods rows, and the same order in every transaction means they
    never deadlock.
    """
    ids = sorted(set(goods_ids))
    query = select(goods.c.id, column).where(goods.c.id.in_(ids)).order_by(goods.c.id)
    got = dict(conn.execute(locked(conn, query, skip_locked=True)).all())
    missing = [i for i in ids if i not in got]
    # A plain read takes no lock and waits for none: it only tells "locked" from "not there".
    busy = set(conn.execute(select(goods.c.id).where(goods.c.id.in_(missing))).scalars()) if missing else set()
    return got, busy


def settle_goods(conn: Connection, column: Column, moves: Mapping[int, tuple[int, int]], fits) -> None:
    """Lock the goods of ``moves`` (row id -> (goods id, delta)) and apply the deltas in one UPDATE.

    Called last in a batch, so the goods rows are held only until the commit. Rows whose goods
    someone else holds, or whose locked value no longer ``fits(current, total_delta)`` (it moved
    since ``process`` read it), are Contended: the batch is done again without them.
    """
    deltas: dict[int, int] = defaultdict(int)
    for goods_id, delta in moves.values():
        deltas[goods_id] += delta
    if not deltas:
        return
    current, busy = lock_goods(conn, deltas, column)
    moved = {g for g, d in deltas.items() if g not in busy and (g not in current or not fits(current[g], d))}
    if busy or moved:
        held = busy | moved
        raise Contended(
            {rid for rid, (goods_id, _) in moves.items() if goods_id in held},
            f"GOODS_BUSY: goods {', '.join(map(str, sorted(held)[:5]))} locked by another transaction; will retry",
        )
    adjust_goods(conn, column, deltas)


def adjust_goods(conn: Connection, column: Column, deltas: Mapping[int, int]) -> None:
    """One aggregated UPDATE for the whole batch: ``column += delta`` per goods row."""
    if deltas:
        conn.execute(update(goods).where(goods.c.id.in_(list(deltas))).values({column: column + by_id(goods.c.id, dict(deltas), else_=0)}))
