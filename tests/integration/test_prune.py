"""`prune` on SQLite and MariaDB: only finished rows move, whole, once; a crash, a lock or a stop loses nothing.

Given a database with finished orders and every kind of row that must stay (pending, rejected,
CLOSED, leased, still polling, recently changed, young), when prune runs, then exactly the finished
rows are in the archives, equal column for column, and goods_order2 is as it was, byte for byte.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, event, insert, select, text

from cancel_scanner import models
from cancel_scanner.operations import prune as pruning
from cancel_scanner.operations.daily import prune_job
from cancel_scanner.operations.prune import LOCK_WAIT_SECONDS, PruneError, prune
from tests.flow import add_goods, add_order, pending, request_cancel, test_config
from tests.pruning import AGE, LIVE, OLD, assert_moved_whole, db_now, live_and_archived, seed, shop_bytes, snapshot

BATCH = 7


class PowerCut(BaseException):
    """Not an error the process handles: it is simply gone."""


# --- what moves, what stays -------------------------------------------------------------------------


def test_only_finished_rows_move_whole_and_the_shops_tables_are_untouched(db):
    seeded = seed(db)
    before, shop = snapshot(db), shop_bytes(db)

    report = prune(db, older_than=AGE, batch_size=BATCH)

    assert_moved_whole(db, before, seeded)
    assert shop_bytes(db) == shop
    by_table = {t.table: t for t in report.tables}
    for name, ids in seeded.moves.items():
        assert by_table[name].moved == len(ids)
        assert by_table[name].ended == pruning.NOTHING_LEFT
        assert by_table[name].left_locked == 0
    assert by_table["req_order_ops"].batches == 7  # 45 rows, scanned 7 at a time
    again = prune(db, older_than=AGE, batch_size=BATCH)
    assert again.moved == 0
    assert_moved_whole(db, before, seeded)


def test_a_dry_run_moves_nothing_and_counts_what_the_run_then_moves(db):
    seeded = seed(db)
    before, shop = snapshot(db), shop_bytes(db)

    dry = prune(db, older_than=AGE, batch_size=BATCH, dry_run=True)

    assert snapshot(db) == before and shop_bytes(db) == shop
    assert all(not archived for _live, archived in live_and_archived(db).values())
    real = prune(db, older_than=AGE, batch_size=BATCH)
    counted = {t.table: (t.moved, t.batches) for t in dry.tables}
    assert counted == {t.table: (t.moved, t.batches) for t in real.tables}
    assert {name: n for name, (n, _b) in counted.items()} == {name: len(ids) for name, ids in seeded.moves.items()}


def test_a_crash_in_the_third_batch_loses_nothing_and_a_rerun_moves_the_rest(db):
    seeded = seed(db)
    before = snapshot(db)
    deletes = []

    def cut_power(_conn, _cursor, statement, _parameters, _context, _many):
        if re.match(r"\s*DELETE\b.*\bFROM req_order_ops\b", statement):
            deletes.append(statement)
            if len(deletes) == 3:  # batch 3: its INSERT into the archive ran, its DELETE never returns
                raise PowerCut()

    event.listen(db, "before_cursor_execute", cut_power)
    try:
        with pytest.raises(PowerCut):
            prune(db, older_than=AGE, batch_size=BATCH)
    finally:
        event.remove(db, "before_cursor_execute", cut_power)

    for name, (live, archived) in live_and_archived(db).items():
        assert not live & archived, name  # nothing in both
        assert live | archived == set(before[name]), name  # nothing lost
    live, archived = live_and_archived(db)["req_order_ops"]
    assert len(archived) == 2 * BATCH  # batches 1 and 2 committed, batch 3 rolled back whole
    assert not live_and_archived(db)["refund_order"][1]  # the crash came before the next table

    prune(db, older_than=AGE, batch_size=BATCH)
    assert_moved_whole(db, before, seeded)


def test_a_stop_ends_the_run_between_two_batches_and_the_next_run_goes_on(db):
    seeded = seed(db)
    before = snapshot(db)
    batches = []
    db_engine = db

    def count(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("DELETE"):
            batches.append(statement)

    event.listen(db_engine, "after_cursor_execute", count)
    try:
        report = prune(db, older_than=AGE, batch_size=BATCH, should_stop=lambda: len(batches) >= 2)
    finally:
        event.remove(db_engine, "after_cursor_execute", count)
    assert report.stopped and [t.table for t in report.tables] == ["req_order_ops"]
    assert report.tables[0].moved == 2 * BATCH and report.tables[0].ended == pruning.STOPPED

    prune(db, older_than=AGE, batch_size=BATCH)
    assert_moved_whole(db, before, seeded)


def test_a_run_stops_at_its_row_limit(db):
    seeded = seed(db)
    report = prune(db, older_than=AGE, batch_size=BATCH, max_rows=10)
    assert [(t.moved, t.ended) for t in report.tables] == [(10, pruning.ROW_LIMIT)] * 3
    prune(db, older_than=AGE, batch_size=BATCH)
    assert {t: a for t, (_l, a) in live_and_archived(db).items()} == seeded.moves


def test_a_row_already_in_the_archive_stops_the_run_loudly_and_nothing_of_its_batch_moves(db):
    seed(db)
    with db.begin() as conn:  # "impossible": a live row that is in the archive already
        row = conn.execute(select(models.refund_order).where(models.refund_order.c.id == 10)).mappings().one()
        conn.execute(insert(models.refund_order_archive).values(**row))
    with pytest.raises(PruneError, match="refund_order.*already in refund_order_archive"):
        prune(db, older_than=AGE, batch_size=BATCH)
    live, archived = live_and_archived(db)["refund_order"]
    assert set(range(8, 15)) <= live  # the batch holding 10 (ids 8..14) rolled back whole
    assert archived == set(range(1, 8)) | {10}  # batch 1, and the planted copy


def test_an_age_under_a_day_is_refused():
    with pytest.raises(ValueError):
        prune(None, older_than=timedelta(hours=23), batch_size=BATCH)


# --- locks: never stalled past the bound ---------------------------------------------------------------


def prune_while_another_transaction(db, holds):
    """One prune run while another connection's open transaction holds what ``holds(connection)`` took;
    that transaction rolls back after. Returns (the prune's report, the seconds it took)."""
    holder = db.connect()
    holder.begin()
    holds(holder)
    try:
        started = time.monotonic()
        report = prune(db, older_than=AGE, batch_size=BATCH)
        return report, time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.mysql
def test_a_finished_row_another_transaction_holds_is_skipped_at_once_and_moved_by_the_next_run(mysql_db):
    db = mysql_db
    seeded = seed(db)
    before = snapshot(db)
    report, took = prune_while_another_transaction(
        db, lambda holder: holder.execute(text("SELECT id FROM req_order_ops WHERE id = 12 FOR UPDATE"))
    )
    assert not any(t.put_off for t in report.tables)  # SKIP LOCKED: not one batch waited
    assert took < LOCK_WAIT_SECONDS + 3
    reqs = report.tables[0]
    assert (reqs.table, reqs.left_locked, reqs.moved) == ("req_order_ops", 1, len(seeded.moves["req_order_ops"]) - 1)
    assert 12 in live_and_archived(db)["req_order_ops"][0]

    prune(db, older_than=AGE, batch_size=BATCH)
    assert_moved_whole(db, before, seeded)


@pytest.mark.mysql
def test_a_lock_prune_must_wait_for_puts_its_batch_off_within_the_bound(mysql_db):
    """Another transaction's uncommitted archive row of the same id (as a second prune's batch in
    flight would hold): the INSERT waits at most LOCK_WAIT_SECONDS, twice, then leaves the batch."""
    db = mysql_db
    seeded = seed(db)
    before = snapshot(db)

    def archive_row_12(holder):
        row = holder.execute(select(models.req_order_ops).where(models.req_order_ops.c.id == 12)).mappings().one()
        holder.execute(insert(models.req_order_ops_archive).values(**row))

    report, took = prune_while_another_transaction(db, archive_row_12)
    reqs = {t.table: t for t in report.tables}["req_order_ops"]
    assert 2 * LOCK_WAIT_SECONDS - 0.5 < took < 2 * LOCK_WAIT_SECONDS + 3  # two waits, each cut at the bound
    assert (reqs.put_off, reqs.left_locked) == (2, BATCH)  # the batch of ids 8..14: tried, tried again, left
    assert reqs.moved == len(seeded.moves["req_order_ops"]) - BATCH
    assert set(range(8, 15)) <= live_and_archived(db)["req_order_ops"][0]
    assert all(t.moved == len(seeded.moves[t.table]) for t in report.tables if t.table != "req_order_ops")

    prune(db, older_than=AGE, batch_size=BATCH)
    assert_moved_whole(db, before, seeded)


@pytest.mark.mysql
def test_every_statement_of_a_run_is_served_by_an_index(mysql_db):
    """EXPLAIN of what prune sends, on tables of a few thousand rows: no table read whole."""
    db = mysql_db
    seed(db, finished_orders=3000)
    with db.begin() as conn:
        conn.execute(text("ANALYZE TABLE req_order_ops, refund_order, goods_order2_oplog"))
    sent: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith(("SELECT", "INSERT", "DELETE")):
            sent.append((statement, parameters))

    event.listen(db, "before_cursor_execute", capture)
    try:
        prune(db, older_than=AGE, batch_size=500, max_rows=1500)
    finally:
        event.remove(db, "before_cursor_execute", capture)

    plans = set()
    with db.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        for statement, parameters in sent:
            if "UTC_TIMESTAMP" in statement:
                continue
            cursor.execute("EXPLAIN " + statement, parameters)
            names = [d[0] for d in cursor.description]
            for row in (dict(zip(names, r)) for r in cursor.fetchall()):
                plans.add(
                    (statement.split()[0], row["table"], row["type"], row["key"], "filesort" in (row["Extra"] or ""))
                )
    whole = sorted(p for p in plans if p[2] in ("ALL", "index") or p[4])
    assert not whole, whole
    assert {(verb, table, key) for verb, table, _type, key, _sort in plans} == {
        ("SELECT", "req_order_ops", "idx_req_order_ops_pending"),  # the scan
        ("SELECT", "refund_order", "idx_refund_order_sync_pending"),
        ("SELECT", "goods_order2_oplog", "PRIMARY"),
        ("SELECT", "refund_order", "uk_refund_order_order_seq"),  # open orders
        *(("SELECT", t.name, "PRIMARY") for t in LIVE),  # the lock
        *(("INSERT", t.name, "PRIMARY") for t in LIVE),  # the copy
        *(("DELETE", t.name, "PRIMARY") for t in LIVE),
    }, sorted(plans)


# --- the daemon on a pruned database, and the daily job ---------------------------------------------------


def age_everything(db: Engine, by: timedelta) -> None:
    """Make every row of the three live tables ``by`` older (as if the flow had run that long ago)."""
    when = db_now(db) - by
    with db.begin() as conn:
        for table in LIVE:
            conn.execute(table.update().values(created_at=when, updated_at=when))


def test_the_daemon_keeps_working_on_a_pruned_database(world):
    db = world.db
    add_goods(db, 1, stock=10, sales=5)
    for oid in (101, 102, 103):
        add_order(db, oid, goods_id=1)
        request_cancel(db, oid)
    world.settle()
    age_everything(db, OLD)

    first = prune(db, older_than=AGE, batch_size=2)
    assert {t.table: t.moved for t in first.tables} == {"req_order_ops": 3, "refund_order": 3, "goods_order2_oplog": 15}

    for oid in (201, 202):
        add_order(db, oid, goods_id=1)
        request_cancel(db, oid)
    again = request_cancel(db, 101)  # an order whose whole history is archived
    world.settle()

    assert not pending(db)
    refunded = {oid: world.emulator.fen_refunded.get(f"SO{oid:010d}") for oid in (101, 102, 103, 201, 202)}
    assert refunded == dict.fromkeys((101, 102, 103, 201, 202), 1280)  # each once, none again
    with db.connect() as conn:
        answer = conn.execute(select(models.req_order_ops).where(models.req_order_ops.c.id == again)).mappings().one()
        goods = conn.execute(select(models.goods)).mappings().one()
    # Rejected either way; intake reads only live requests, so the answer is ALREADY_CANCELLED, not DUPLICATE_REQUEST.
    assert (answer["scanned"], answer["success"], answer["result_code"]) == (1, 0, "ALREADY_CANCELLED")
    assert (goods["stock"], goods["sales"]) == (15, 0)

    second = prune(db, older_than=AGE, batch_size=2)
    assert second.moved == 0  # today's rows are young


def test_the_daily_job_prunes_with_the_configured_age_and_batch_and_says_so(db, db_url):
    seeded = seed(db)
    before = snapshot(db)
    stopping = threading.Event()
    off = SimpleNamespace(config=test_config(db_url), db=db, runner=SimpleNamespace(stopping=stopping))
    assert prune_job(off) is None  # off by default

    config = test_config(db_url, prune={"enabled": True, "at": "03:30", "older_than_days": 90, "batch_size": 5})
    app = SimpleNamespace(config=config, db=db, runner=SimpleNamespace(stopping=stopping))
    job = prune_job(app)
    assert (job.name, job.at, job.catch_up) == ("prune", "03:30", False)

    from loguru import logger

    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(m.record["message"]),
        level="INFO",
        filter=lambda r: r["extra"].get("action") == "daily_prune",
    )
    try:
        assert job.run() is None
    finally:
        logger.remove(sink)
    assert_moved_whole(db, before, seeded)
    total = sum(len(ids) for ids in seeded.moves.values())
    assert len(lines) == 1 and lines[0].startswith(f"prune moved {total} row(s) older than ")

    stopping.set()  # the daemon stops: the job moves nothing more
    assert job.run() is None
