"""`prune`: finished rows out of the live tables into their archives, a small batch at a time.

What is finished (nothing a stage or a person still needs; ``goods_order2``, the shop's, is never
read or written here). The cutoff is the database's clock minus ``older_than``; "old" is created
and last changed before it:

- ``req_order_ops``: accepted requests (``scanned=1, success=1``), old. A rejected one (``1/0``)
  stays for good: it is the merchant's answer (``result_code``), the status page lists the latest,
  and a person may requeue it.
- ``refund_order``: done at every stage (submit, progress and sync all ``1/1``: WeChat said SUCCESS
  and the order says REFUNDED), no lease, old, and every other refund of its order in the live table
  the same. A CLOSED refund (progress ``1/0``) stays, and with it every refund of its order:
  ``reissue`` numbers the next refund from the ones it finds, and a person reads them together.
- ``goods_order2_oplog``: events created before the cutoff of an order none of whose live refunds
  is unfinished, leased or changed since the cutoff. Events are never rewritten, so an event moves
  once; every event of a finished order is in the live table or in the archive, never both.

How (each table on its own, in primary key order, from the first id each run):

1. Scan: the next ``batch_size`` rows after the last one looked at, through the index that holds
   the table's finished rows in id order (``idx_req_order_ops_pending`` on (1, 1),
   ``idx_refund_order_sync_pending`` on (1, 1, 1), the oplog's primary key), each with whether it is
   finished. Rows come in id order, and ids follow creation, so the first row created after the
   cutoff ends the table for this run: prune never reads the young end of a table. (A row whose id
   is out of creation order behind it waits for a later run; nothing young is ever moved.)
2. One transaction per batch: the window's finished rows locked (``FOR UPDATE SKIP LOCKED`` on
   MariaDB: a row someone holds is skipped, never waited for), the rules on other rows read again
   (as committed now, without locks), ``INSERT INTO archive SELECT`` them, ``DELETE`` them from the
   live table re-checking in its WHERE that each row is still finished; both counts must equal the
   rows chosen, or the batch rolls back. A row already in the archive fails the INSERT (the
   archive's primary and unique keys): the run stops, loudly, its batch rolled back.
3. A lock wait (``innodb_lock_wait_timeout`` is ``LOCK_WAIT_SECONDS`` on prune's session) or a
   deadlock rolls its batch back; its rows, and the rows skipped as locked, are tried once more
   after the rest of the table, then left for the next run and reported.

A crash anywhere rolls back the batch in hand; a rerun finds what is left. A run stops at
``max_rows`` rows per table, when nothing is left, or between two batches when ``should_stop()``.
A dry run makes the same scan and counts, in transactions it rolls back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from loguru import logger
from sqlalchemy import Connection, Engine, Table, and_, delete, insert, not_, or_, select, text
from sqlalchemy import exc as sa_exc

from cancel_scanner.engine.clock import read_db_now
from cancel_scanner.engine.db import LOCK_WAIT_TIMEOUT_SECONDS
from cancel_scanner.engine.errors import mysql_code
from cancel_scanner.engine.sql import locked
from cancel_scanner.models import ARCHIVES, oplog, refund_order, req_order_ops

MIN_AGE = timedelta(days=1)  # younger rows are the daemon's hand-offs, today's status and yesterday's bill
DEFAULT_MAX_ROWS = 1_000_000  # rows moved per table per run
LOCK_WAIT_SECONDS = 2  # the longest a batch waits for a row lock on MariaDB before it is put off
_LOCK_CODES = {1205, 1213}  # lock wait timeout, deadlock
_SQLITE_LOCKED = ("database is locked", "database table is locked")
# Every statement names its index on MySQL/MariaDB. For ``id IN (...)`` over a fifth of a small
# table MariaDB prefers a full scan: slow for a copy, and a locking full scan waits for every row
# anyone holds (a claim, a checkout), not only for the batch's. NOT EXISTS it may turn into a
# materialized NOT IN, a full scan per batch; prune asks for open orders by key instead.
_MYSQL = ("mysql", "mariadb")
ORDER_INDEX = "uk_refund_order_order_seq"  # refund_order (order_id, refund_seq): an order's refunds

# Why a table's pass ended.
NOTHING_LEFT, ROW_LIMIT, STOPPED = "nothing left", "row limit reached", "stopped"

_log = logger.bind(stage="prune")
q, r, e = req_order_ops.c, refund_order.c, oplog.c


class PruneError(RuntimeError):
    """A batch that must not be retried (a row already archived): the run stops."""


class _CountsDiffer(Exception):
    """A batch whose INSERT and DELETE moved other counts than it chose: rolled back."""


def _settled(cutoff: datetime) -> list:
    """A refund done at every stage, unleased, unchanged since the cutoff."""
    return [
        r.submit_scanned == 1,
        r.submit_success == 1,
        r.progress_scanned == 1,
        r.progress_success == 1,
        r.sync_scanned == 1,
        r.sync_success == 1,
        or_(r.part == 0, and_(r.goods_scanned == 1, r.goods_success == 1)),  # a part's units moved (part_goods)
        r.lease_owner.is_(None),
        r.updated_at < cutoff,
    ]


@dataclass(frozen=True)
class Rule:
    """One live table: where its finished rows are, and what "finished" means for one of them."""

    table: Table
    index: str  # serves ``scope`` in id order
    scope: Callable[[], list]  # the conditions that index serves
    own: Callable[[datetime], list]  # the row's own columns: checked by the scan, under its lock and in the DELETE
    by_order: bool = (
        False  # and its order has no open refund (``open_orders``): checked by the scan and before the DELETE
    )

    @property
    def archive(self) -> Table:
        return ARCHIVES[self.table]


RULES: tuple[Rule, ...] = (
    Rule(
        req_order_ops,
        "idx_req_order_ops_pending",
        scope=lambda: [q.scanned == 1, q.success == 1],
        own=lambda cutoff: [q.scanned == 1, q.success == 1, q.created_at < cutoff, q.updated_at < cutoff],
    ),
    Rule(
        refund_order,
        "idx_refund_order_sync_pending",
        scope=lambda: [r.progress_scanned == 1, r.sync_scanned == 1, r.sync_success == 1],
        own=lambda cutoff: [*_settled(cutoff), r.created_at < cutoff],
        by_order=True,
    ),
    Rule(oplog, "PRIMARY", scope=lambda: [], own=lambda cutoff: [e.created_at < cutoff], by_order=True),
)


def open_orders(conn: Connection, order_ids: Iterable[int], cutoff: datetime) -> set[int]:
    """The orders among ``order_ids`` with a live refund that is not settled: unfinished, CLOSED,
    leased, or changed since the cutoff. Read as committed now, without a lock."""
    wanted = sorted(set(order_ids))
    if not wanted:
        return set()
    query = _using(
        select(r.order_id).where(r.order_id.in_(wanted), not_(and_(*_settled(cutoff)))).distinct(),
        refund_order,
        ORDER_INDEX,
    )
    return set(conn.execute(query).scalars())


@dataclass
class TableResult:
    table: str
    moved: int = 0  # rows moved (a dry run: rows it would move)
    batches: int = 0  # batches committed (a dry run: batches it would take)
    seconds: float = 0.0
    examined: int = 0  # rows the scan looked at
    put_off: int = 0  # batches rolled back on a lock wait, a deadlock or a count that changed
    left_locked: int = 0  # finished rows left for the next run: put off or skipped as locked, twice
    ended: str = NOTHING_LEFT


@dataclass
class PruneReport:
    cutoff: datetime
    older_than: timedelta
    batch_size: int
    dry_run: bool
    tables: list[TableResult] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return sum(t.moved for t in self.tables)

    @property
    def stopped(self) -> bool:
        return any(t.ended == STOPPED for t in self.tables)


def cutoff_for(db: Engine, older_than: timedelta) -> datetime:
    """The database's now minus ``older_than``: one clock for every host that prunes."""
    with db.connect() as conn:
        return read_db_now(conn) - older_than


def prune(
    db: Engine,
    *,
    older_than: timedelta,
    batch_size: int,
    max_rows: int = DEFAULT_MAX_ROWS,
    dry_run: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    now: datetime | None = None,
    on_table: Callable[[TableResult], None] | None = None,
) -> PruneReport:
    """Move (with ``dry_run``: count) the finished rows older than ``older_than``, as the module's docstring says.

    ``now`` replaces the database's clock (tests); ``on_table`` hears each table as it ends.
    Raises ValueError for an age under MIN_AGE, PruneError when a row is already archived, and any
    database error other than a lock wait or a deadlock (the batch in hand rolled back).
    """
    if older_than < MIN_AGE:
        raise ValueError(f"older_than must be at least {MIN_AGE}, got {older_than}")
    if batch_size < 1 or max_rows < 1:
        raise ValueError("batch_size and max_rows must be at least 1")
    cutoff = (now - older_than) if now is not None else cutoff_for(db, older_than)
    report = PruneReport(cutoff, older_than, batch_size, dry_run)
    with db.connect() as conn:
        mysql = conn.dialect.name in _MYSQL
        if mysql:
            conn.execute(text(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}"))
            conn.commit()
        try:
            for rule in RULES:
                result = _Pass(conn, rule, cutoff, batch_size, max_rows, dry_run, should_stop).run()
                report.tables.append(result)
                if on_table is not None:
                    on_table(result)
                if result.ended == STOPPED:
                    break
        finally:
            if mysql:
                _restore_session(conn)
    return report


def _restore_session(conn: Connection) -> None:
    """The pool's usual lock wait again; a connection that cannot say so leaves the pool."""
    if conn.invalidated:
        return
    try:
        conn.rollback()
        conn.execute(text(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_SECONDS}"))
        conn.commit()
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more; the connection is dropped
        _log.bind(action="session_not_restored").debug("dropping prune's connection: {}", type(exc).__name__)
        conn.invalidate()


class _Pass:
    """One table, one run: windows in id order, a batch each, then one more try for the rows put off."""

    def __init__(
        self,
        conn: Connection,
        rule: Rule,
        cutoff: datetime,
        batch_size: int,
        max_rows: int,
        dry_run: bool,
        should_stop: Callable[[], bool],
    ) -> None:
        self.conn, self.rule, self.cutoff = conn, rule, cutoff
        self.batch_size, self.max_rows, self.dry_run, self.should_stop = batch_size, max_rows, dry_run, should_stop
        self.result = TableResult(rule.table.name)
        self.log = _log.bind(table=rule.table.name, dry_run=dry_run)
        self.order_of: dict[int, int] = {}  # the chosen rows' orders, for the check before the DELETE

    def run(self) -> TableResult:
        started = time.monotonic()
        put_off: list[int] = []
        after, end = 0, None
        while end is None:
            if self.should_stop():
                end = STOPPED
            elif self.result.moved >= self.max_rows:
                end = ROW_LIMIT
            else:
                after, young = self._window(after, put_off)
                if young:
                    end = NOTHING_LEFT
        if end == NOTHING_LEFT:  # after a stop or at the limit, rows put off are simply the next run's
            for i in range(0, len(put_off), self.batch_size):
                if self.should_stop() or self.result.moved >= self.max_rows:
                    end = STOPPED if self.should_stop() else ROW_LIMIT
                    break
                left: list[int] = []
                part = put_off[i : i + self.batch_size]
                self._batch(lambda: self._rescan(part), left)  # noqa: B023 - called in this iteration
                self.result.left_locked += len(left)
        self.result.ended = end
        self.result.seconds = time.monotonic() - started
        name = self.rule.table.name
        if self.result.left_locked:
            self.log.bind(action="left_locked", rows=self.result.left_locked).warning(
                "{}: {} finished row(s) held by other transactions twice: left for the next run",
                name,
                self.result.left_locked,
            )
        self.log.bind(
            action="table_pruned",
            moved=self.result.moved,
            batches=self.result.batches,
            seconds=round(self.result.seconds, 3),
            ended=end,
        ).info(
            "{} {} {} row(s) in {} batch(es), {:.1f} s ({})",
            name,
            "would move" if self.dry_run else "moved",
            self.result.moved,
            self.result.batches,
            self.result.seconds,
            end,
        )
        return self.result

    # --- choosing -------------------------------------------------------------------------------

    def _window(self, after: int, put_off: list[int]) -> tuple[int, bool]:
        """One window after ``after``, its finished rows moved; (the last id looked at, the young end reached)."""
        seen: dict[str, Any] = {"after": after, "young": False}

        def scan() -> list[int]:
            t = self.rule.table
            query = _using(
                select(t.c.id, t.c.created_at, t.c.order_id, and_(*self.rule.own(self.cutoff)).label("finished"))
                .where(*self.rule.scope(), t.c.id > after)
                .order_by(t.c.id)
                .limit(self.batch_size),
                t,
                self.rule.index,
            )
            rows = self.conn.execute(query).all()
            finished = []
            for row in rows:
                if row.created_at >= self.cutoff:
                    seen["young"] = True  # ids follow creation: the rest of the table is younger still
                    break
                seen["after"] = row.id
                self.result.examined += 1
                if row.finished:
                    finished.append((row.id, row.order_id))
            if len(rows) < self.batch_size:
                seen["young"] = True
            return self._of_settled_orders(finished)

        self._batch(scan, put_off)
        return int(seen["after"]), bool(seen["young"])

    def _rescan(self, ids: Sequence[int]) -> list[int]:
        """Which of ``ids`` (put off earlier) are finished now."""
        t = self.rule.table
        query = _using(
            select(t.c.id, t.c.order_id).where(t.c.id.in_(list(ids)), *self.rule.own(self.cutoff)).order_by(t.c.id),
            t,
            "PRIMARY",
        )
        return self._of_settled_orders([tuple(row) for row in self.conn.execute(query)])

    def _of_settled_orders(self, rows: list[tuple[int, int]]) -> list[int]:
        """The ids of ``rows`` (id, order_id) that may move: all, or with ``by_order`` those of orders without an
        open refund; at most what the row limit leaves."""
        if self.rule.by_order:
            busy = open_orders(self.conn, (order_id for _id, order_id in rows), self.cutoff)
            rows = [(row_id, order_id) for row_id, order_id in rows if order_id not in busy]
        rows = rows[: self.max_rows - self.result.moved]
        self.order_of = dict(rows)
        return [row_id for row_id, _order_id in rows]

    # --- one batch, one transaction ---------------------------------------------------------------

    def _batch(self, choose: Callable[[], list[int]], put_off: list[int]) -> None:
        """Choose the ids in a new transaction, lock them, copy them, delete them, commit.

        A lock wait, a deadlock or counts that changed roll the batch back and add its ids to
        ``put_off``, as do rows skipped as locked; anything else raises, the batch rolled back."""
        chosen: list[int] | None = None
        tx = self.conn.begin()
        try:
            chosen = choose()
            if self.dry_run:
                tx.rollback()
                self._done(len(chosen))
                return
            held = self._lock(chosen) if chosen else []
            put_off.extend(sorted(set(chosen) - set(held)))
            moved = self._move(held) if held else 0
            tx.commit()
        except (sa_exc.OperationalError, _CountsDiffer) as exc:
            tx.rollback()
            if chosen is None or not (isinstance(exc, _CountsDiffer) or _is_lock_error(exc)):
                raise
            put_off.extend(chosen)
            self.result.put_off += 1
            self.log.bind(action="batch_put_off", rows=len(chosen)).warning(
                "{}: a batch of {} row(s) put off ({}): tried again after the rest of the table",
                self.rule.table.name,
                len(chosen),
                exc if isinstance(exc, _CountsDiffer) else _reason(exc),
            )
            return
        except sa_exc.IntegrityError as exc:
            tx.rollback()
            assert chosen is not None  # only the archive's INSERT, after choose(), raises this
            raise PruneError(
                f"{self.rule.table.name}: a row of ids {chosen[0]}..{chosen[-1]} is already in"
                f" {self.rule.archive.name}: nothing of this batch moved; a person must look"
                f" ({_reason(exc)})"
            ) from exc
        except BaseException:
            tx.rollback()
            raise
        self._done(moved)
        if moved:
            self.log.bind(action="batch_moved", rows=moved, first_id=held[0], last_id=held[-1]).debug(
                "{}: moved {} row(s), ids {}..{}", self.rule.table.name, moved, held[0], held[-1]
            )

    def _done(self, rows: int) -> None:
        if rows:
            self.result.moved += rows
            self.result.batches += 1

    def _lock(self, ids: list[int]) -> list[int]:
        """Those of ``ids`` still finished by their own columns, locked; rows someone else holds are left out."""
        t = self.rule.table
        query = _using(
            select(t.c.id).where(t.c.id.in_(ids), *self.rule.own(self.cutoff)).order_by(t.c.id), t, "PRIMARY"
        )
        return list(self.conn.execute(locked(self.conn, query, skip_locked=True)).scalars())

    def _move(self, ids: list[int]) -> int:
        """Copy ``ids`` (locked) to the archive and delete them, each still finished; the count moved."""
        live, archive = self.rule.table, self.rule.archive
        if self.rule.by_order:
            # Read again now, without a lock: a subquery inside the DELETE would take shared locks
            # (InnoDB does for a DELETE even under READ COMMITTED), and one refund someone holds
            # would stall every batch of its order's events by the lock wait.
            busy = open_orders(self.conn, (self.order_of[i] for i in ids), self.cutoff)
            ids = [i for i in ids if self.order_of[i] not in busy]
            if not ids:
                return 0
        names = [c.name for c in live.columns]
        source = _using(select(*(live.c[n] for n in names)).where(live.c.id.in_(ids)), live, "PRIMARY")
        copied = self.conn.execute(insert(archive).from_select(names, source)).rowcount
        removal = delete(live).where(live.c.id.in_(ids), *self.rule.own(self.cutoff))
        for name in _MYSQL:  # DELETE t FROM t FORCE INDEX (...): the DELETE syntax that takes an index hint
            removal = removal.prefix_with(live.name, dialect=name).with_hint("FORCE INDEX (PRIMARY)", dialect_name=name)
        deleted = self.conn.execute(removal).rowcount
        if copied != len(ids) or deleted != len(ids):
            raise _CountsDiffer(f"{len(ids)} chosen, {copied} copied, {deleted} deleted")
        return deleted


def _using(query, table: Table, index: str):
    """``query`` reading ``table`` through ``index`` only, on MySQL/MariaDB."""
    for name in _MYSQL:
        query = query.with_hint(table, f"FORCE INDEX ({index})", name)
    return query


def _is_lock_error(exc: BaseException) -> bool:
    code = mysql_code(exc)
    if code is not None:
        return code in _LOCK_CODES
    message = str(getattr(exc, "orig", exc)).lower()
    return any(fragment in message for fragment in _SQLITE_LOCKED)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", exc)
    return str(orig).splitlines()[0][:200] if str(orig) else type(exc).__name__


def summary(report: PruneReport) -> str:
    """One line: what a run moved (or would), per table."""
    verb = "would move" if report.dry_run else "moved"
    parts = [f"{t.table} {t.moved}" + (f" ({t.left_locked} locked)" if t.left_locked else "") for t in report.tables]
    return f"prune {verb} {report.moved} row(s) older than {report.cutoff:%Y-%m-%d %H:%M:%S} UTC: " + ", ".join(parts)
