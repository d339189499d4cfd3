"""The shop's own rows that several stages write: the order oplog and the goods' stock and sales.

Beside the stages, not in the engine: this is shop-specific SQL, and the engine knows no table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column, Connection, Row, cast, insert, or_, select, update

from cancel_scanner.engine.logs import EventLog
from cancel_scanner.engine.outcome import Contended, Done, Failed, Outcome, clip
from cancel_scanner.engine.sql import IntCase, locked
from cancel_scanner.engine.stage import StageDefaults
from cancel_scanner.models import goods, goods_order2, oplog
from cancel_scanner.models.types import SignedInt

ALREADY_LOGGED = "ALREADY_LOGGED"


def write_oplog(conn: Connection, events: Iterable[tuple[int, str, str | None]], *, keep_existing: bool = True) -> int:
    """One multi-row INSERT of the events not written yet.

    The unique key (order_id, event) holds each event once. One already there was written by
    someone else (a shop's tool, a restored backup) or by an earlier life of this row: the oplog is
    the shop's record, not what decides whether we act (each stage's own flag does, flipped in this
    same transaction), so the one there is kept, ours is not added, and the batch goes on.
    ``keep_existing=False``: one already there fails the INSERT (a stage that checked first, GoodsMove).
    """
    rows = [
        {"order_id": order_id, "event": event, "detail": clip(detail) if detail else None}
        for order_id, event, detail in events
    ]
    if not rows:
        return 0
    if not keep_existing:
        conn.execute(insert(oplog), rows)
        return len(rows)
    there = {
        tuple(found)
        for found in conn.execute(
            select(oplog.c.order_id, oplog.c.event).where(
                oplog.c.order_id.in_(sorted({r["order_id"] for r in rows})),
                oplog.c.event.in_(sorted({r["event"] for r in rows})),
            )
        )
    }
    new = [r for r in rows if (r["order_id"], r["event"]) not in there]
    for r in rows:
        if (r["order_id"], r["event"]) in there:
            EventLog(action="oplog_event_exists", order_id=r["order_id"], event=r["event"]).warning(
                "oplog already has {} for order {}: kept as it is", r["event"], r["order_id"]
            )
    if new:
        conn.execute(insert(oplog), new)
    return len(new)


def cancelled(now: datetime, refund_status: str, **more: Any) -> dict[str, Any]:
    """An order's columns once it is cancelled, all of its units (``more``: its cancel_source, ...)."""
    o = goods_order2.c
    return {"order_status": "CANCELLED", "cancelled_at": now, "refund_status": refund_status, **more} | {
        "cancelled_quantity": o.quantity
    }


def refund_event(event: str, refund_seq: int) -> str:
    """The oplog event of a refund: the first refund of an order keeps the plain name, a later one
    (after `reissue`) adds its number, so that each refund's events are once each under the unique key."""
    return event if refund_seq == 1 else f"{event}#{refund_seq}"


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
        conn.execute(
            update(goods)
            .where(goods.c.id.in_(list(deltas)))
            .values({column: column + IntCase(goods.c.id, dict(deltas))})
        )


class GoodsMove(StageDefaults):
    """A database stage that moves one goods column by each order's quantity, exactly once.

    A subclass says which column (``column``), which way (``sign``), what it writes to the oplog
    (``event``), how its orders are ordered (``ready_order``: the index's order) and what a move
    may not do (``refusal``). The decisions are made on an unlocked read in ``process``; the
    goods rows are locked and moved last, in ``finish``, so the shop's checkouts wait for this
    stage only from there to the commit.
    """

    column: ClassVar[Column]
    sign: ClassVar[int]  # +1 gives back (stock), -1 takes away (sales)
    event: ClassVar[str]
    not_moved: ClassVar[str]  # how a refused row's message ends: "stock not restored"
    ready_order: ClassVar[tuple]

    def refusal(self, goods_id: int, current: int, quantity: int) -> Failed | None:
        """Why moving ``current`` by ``quantity`` would be wrong, or None."""
        raise NotImplementedError

    def pending(self) -> list:
        """WHERE clauses for the orders this move still has to make."""
        raise NotImplementedError

    def ready(self, now: datetime, limit: int):
        o, flags = goods_order2.c, self.flags
        return (
            # The units this move owes: the order's, but those a partial cancel's refund moved (part_goods).
            # Signed: a shop that lowered quantity below the parts fails that row (below), not the claim (error 1690).
            select(
                o.id,
                o.goods_id,
                (cast(o.quantity, SignedInt) - cast(o.parts_quantity, SignedInt)).label("quantity"),
                flags.attempts,
            )
            .where(*self.pending(), or_(flags.next_attempt_at.is_(None), flags.next_attempt_at <= now))
            # In index order: no sort of every pending row, and FOR UPDATE locks only the rows
            # returned, not all it read to sort them.
            .order_by(*self.ready_order)
            .limit(limit)
        )

    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> dict[int, Outcome]:
        current = read_goods(conn, (row.goods_id for row in rows), self.column)
        # The event already in the oplog (someone else wrote it, or this order's goods moved once and
        # its flags were reset by hand): nobody can tell whether the goods moved, so they are not moved
        # again, and a person looks.
        logged = set(
            conn.execute(
                select(oplog.c.order_id).where(
                    oplog.c.order_id.in_([row.id for row in rows]), oplog.c.event == self.event
                )
            ).scalars()
        )
        outcomes: dict[int, Outcome] = {}
        moved: dict[int, int] = defaultdict(int)
        events = []
        for row in rows:
            if row.id in logged:
                outcomes[row.id] = Failed(
                    ALREADY_LOGGED,
                    f"the oplog already has {self.event} for this order, not written by this"
                    f" stage: {self.not_moved} again; check goods {row.goods_id} by hand",
                )
                continue
            if row.quantity < 0:
                outcomes[row.id] = Failed(
                    "QUANTITY_BELOW_PARTS",
                    f"the order's quantity is below the units its partial cancels moved; {self.not_moved}, check it",
                )
                continue
            if row.goods_id not in current:
                outcomes[row.id] = Failed("GOODS_NOT_FOUND", f"goods {row.goods_id} does not exist; {self.not_moved}")
                continue
            refused = self.refusal(row.goods_id, current[row.goods_id] + moved[row.goods_id], row.quantity)
            if refused is not None:
                outcomes[row.id] = refused
                continue
            moved[row.goods_id] += self.sign * row.quantity
            events.append((row.id, self.event, f"goods {row.goods_id} {self.sign * row.quantity:+d}"))
            outcomes[row.id] = Done()
        write_oplog(conn, events, keep_existing=False)  # one written since the read above fails the row (isolated)
        return outcomes

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes, now: datetime) -> None:
        moves = {row.id: (row.goods_id, self.sign * row.quantity) for row in rows if isinstance(outcomes[row.id], Done)}
        settle_goods(
            conn, self.column, moves, fits=lambda value, delta: self.refusal(0, value, self.sign * delta) is None
        )
