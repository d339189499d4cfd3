"""Scaling: rows/s of each database stage with 1, 2 and 3 daemons, on one server and on a Galera cluster, against a hand-written loop.

For each of intake, sync_result, restore_stock and decrement_sales (issue 16, throughput that
scales with daemons):

1. fleets: in a fresh database, seed N rows ready for the stage (bench/seed.py) but held back
   (their next_attempt_at far ahead; sync_result's refunds not yet polled, progress_scanned = 0),
   start 1, 2 or 3 daemons (``cancel-scanner run``, only that stage on, jobs.yaml's interval and
   batch size, as bench/stages.py runs them) and wait until all of them run; then stop them
   (SIGSTOP), release the rows in one UPDATE, and continue them together (SIGCONT) a little more
   than one interval later: every daemon's next poll is then due at once, so the whole fleet starts
   on the same backlog at the same moment, instead of each at its own phase of the 2 s interval.
   Rate from the database's timestamps, as bench/stages.py takes it: (N - one batch per daemon) /
   (last flip - first flip); the fleet's first batches end together. Setups:
   a. one MariaDB server (``database.Bench``), every daemon on it;
   b. a three-node Galera cluster on loopback (testsupport/galera.py), daemon k on node k
      (one daemon: node 0 only), seeding and counting through node 0.
   Per setup also: lost claims (batches that rolled back because another daemon won the rows:
   the runner's ``batch_aborted`` DEBUG records naming LostClaim or error 1213), rows deferred
   because another transaction held their order or goods row (Later, from the ``batch`` records),
   and on the cluster the nodes' certification failures and brute-force aborts (wsrep counters);
2. the framework's overhead: a hand-written PyMySQL loop per stage (no SQLAlchemy, no engine)
   that sends the same statements per batch as the stage (the same claim ... FOR UPDATE SKIP
   LOCKED, the same reads, UPDATEs, multi-row INSERTs and guarded flag flip, one COMMIT per
   batch), drained in this process on a fresh copy of the same seeded data on the server, rate
   taken the same way. Before anything is timed, one batch of the stage run by a Runner in this
   process and one batch of the hand loop are captured on the wire (every command PyMySQL sends)
   and their statements compared, literals aside: any difference fails the run
   (``--show-statements`` prints both). Every drain, hand loop and daemons alike, must end in the
   same state (flags, orders, refunds, oplog, goods stock and sales; times and auto-increment ids
   aside), or the run fails.

Targets: hand loop <= 2 x the daemon's rows/s (1 daemon, one server: the framework costs at most
half); 2 and 3 daemons >= 0.9 x one daemon's rows/s, on the server and on the cluster alike (on two
shared cores more daemons add no CPU, so the target is that they cost none).

    PYTHONPATH=. python bench/scaling.py [--quick] [--n 30000] [--stages intake,restore_stock] [--no-cluster] [--show-statements]
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pymysql

from bench import OUT_DIR, configs, database, reporting, seed
from bench.emulator_server import EmulatorProcess
from cancel_scanner.engine.db import LOCK_WAIT_TIMEOUT_SECONDS, init_schema, make_engine
from cancel_scanner.scanners.intake import (
    ACCEPTED_PAID,
    CANCEL_SOURCES,
    REFUND_WINDOW,
    out_refund_no_for,
    wechat_reason,
)
from cancel_scanner.scanners.restore_stock import UINT_MAX
from testsupport import galera
from testsupport.processes import START_TIMEOUT_SECONDS, DaemonProcess, parse_records
from testsupport.waiting import wait_until

FLEETS = (1, 2, 3)
OVERHEAD_TARGET = 2.0  # hand loop rows/s <= this x the daemon's
SCALING_TARGET = 0.9  # k daemons' rows/s >= this x one daemon's
DRAIN_STALL_SECONDS = 180.0  # no progress this long: the run is broken, not slow
DRAIN_TIMEOUT_SECONDS = 3600.0
HELD_UNTIL = "2100-01-01"  # next_attempt_at of a held-back row
RELEASE_TRIES = 10
LOST_BATCH_LOG_SECONDS = 0.02  # a lost batch's own "batch" record follows its batch_aborted this closely


@dataclass(frozen=True)
class Spec:
    table: str
    scanned: str
    success: str
    hold: str  # SET clause that holds the seeded rows back
    release: str  # SET clause that makes them ready, all in one statement


SPECS = {
    "intake": Spec(
        "req_order_ops", "scanned", "success", f"next_attempt_at = '{HELD_UNTIL}'", "next_attempt_at = NULL"
    ),
    "sync_result": Spec("refund_order", "sync_scanned", "sync_success", "progress_scanned = 0", "progress_scanned = 1"),
    "restore_stock": Spec(
        "goods_order2",
        "stock_scanned",
        "stock_success",
        f"stock_next_attempt_at = '{HELD_UNTIL}'",
        "stock_next_attempt_at = NULL",
    ),
    "decrement_sales": Spec(
        "goods_order2",
        "sales_scanned",
        "sales_success",
        f"sales_next_attempt_at = '{HELD_UNTIL}'",
        "sales_next_attempt_at = NULL",
    ),
}

# What "the same end state" compares: per table, the columns a drain writes or depends on,
# times only as NULL or not, and no auto-increment ids (they differ per Galera node and per fleet).
STATE_COLUMNS = {
    "req_order_ops": "id, order_id, scanned, success, result_code, result_msg, attempts, last_error, "
    "next_attempt_at IS NULL, scanned_at IS NULL",
    "goods_order2": "id, order_status, cancel_source, refund_status, wx_progress_scanned, cancelled_at IS NULL, "
    "refunded_at IS NULL, stock_scanned, stock_success, stock_attempts, stock_last_error, "
    "stock_next_attempt_at IS NULL, sales_scanned, sales_success, sales_attempts, sales_last_error, "
    "sales_next_attempt_at IS NULL",
    "refund_order": "order_id, req_id, refund_seq, out_refund_no, out_trade_no, transaction_id, refund_amount, "
    "total_amount, reason, submit_scanned, submit_success, submit_sent, progress_scanned, "
    "progress_success, sync_scanned, sync_success, attempts, last_error, next_attempt_at IS NULL",
    "goods_order2_oplog": "order_id, event, detail",
    "goods": "id, stock, sales",
}


# --- seeding and end state ---------------------------------------------------------------------


def seed_held(conn, stage: str, n: int) -> None:
    """N rows ready for ``stage`` (seed.ready_for), held back, statistics fresh, purge caught up."""
    spec = SPECS[stage]
    seed.ready_for(conn, stage, n)
    database.sql(conn, f"UPDATE {spec.table} SET {spec.hold}")
    database.wait_for_purge(conn)


def release(conn, stage: str) -> None:
    """Every held-back row ready at once (one UPDATE, one commit)."""
    spec = SPECS[stage]
    database.sql(conn, f"UPDATE {spec.table} SET {spec.release}")


def end_state(conn) -> dict[str, tuple[int, int]]:
    """Per table: rows, and a checksum of STATE_COLUMNS over all of them (order-independent)."""
    out = {}
    for table, columns in STATE_COLUMNS.items():
        values = ", ".join(f"COALESCE({c}, '~')" for c in columns.split(", "))
        count, checksum = database.sql(
            conn, f"SELECT COUNT(*), COALESCE(SUM(CRC32(CONCAT_WS('|', {values}))), 0) FROM {table}"
        )[0]
        out[table] = (int(count), int(checksum))
    return out


def totals(conn, stage: str) -> dict[str, int]:
    """The end state a person reads: rows done, oplog rows, refunds, goods stock and sales."""
    spec = SPECS[stage]
    return {
        "done": int(
            database.scalar(conn, f"SELECT COUNT(*) FROM {spec.table} WHERE {spec.scanned} = 1 AND {spec.success} = 1")
        ),
        "oplog": int(database.scalar(conn, "SELECT COUNT(*) FROM goods_order2_oplog")),
        "refunds": int(database.scalar(conn, "SELECT COUNT(*) FROM refund_order")),
        "stock": int(database.scalar(conn, "SELECT COALESCE(SUM(stock), 0) FROM goods")),
        "sales": int(database.scalar(conn, "SELECT COALESCE(SUM(sales), 0) FROM goods")),
    }


@dataclass
class Drain:
    rows: int
    rate: float | None
    span: float
    wall: float
    cpu: float  # client CPU seconds (the daemons', or this process's for the hand loop)
    state: dict
    totals: dict
    lost: int = 0
    deferred: int = 0
    aborted: int = 0  # batches rolled back for another reason (a transient error)
    cert_failures: int | None = None


def flip_rate(conn, stage: str, before: int) -> tuple[int, float | None, float]:
    """Rows flipped, (rows - ``before``) / (last flip - first flip), and that span, from updated_at.

    ``before``: the rows whose work the first flip ends, and that the span therefore does not time.
    """
    spec = SPECS[stage]
    count, first, last = database.sql(
        conn, f"SELECT COUNT(*), MIN(updated_at), MAX(updated_at) FROM {spec.table} WHERE {spec.scanned} = 1"
    )[0]
    span = (last - first).total_seconds() if count else 0.0
    return int(count), ((count - before) / span if span > 0 else None), span


def check_same(what: str, drain: Drain, reference: Drain) -> None:
    if drain.state != reference.state:
        differ = [t for t in STATE_COLUMNS if drain.state[t] != reference.state[t]]
        raise SystemExit(
            f"FAILED: {what} did not end in the hand loop's state (tables differing: {', '.join(differ)});\n"
            f"  {what}: {drain.totals}\n  hand loop: {reference.totals}"
        )


# --- the daemons -------------------------------------------------------------------------------


def drain_with_daemons(
    emulator: EmulatorProcess, urls: Sequence[str], conn, stage: str, n: int, batch: int, tag: str
) -> Drain:
    """One daemon per URL; once all run, the rows released to all of them at once; until all N are flipped."""
    spec = SPECS[stage]
    done_sql = f"SELECT COUNT(*) FROM {spec.table} WHERE {spec.scanned} = 1"
    with ExitStack() as stack:
        fleet = []
        for k, url in enumerate(urls):
            raw = {"database_url": url, "wechat": emulator.wechat(), "jobs": configs.jobs(enabled=[stage])}
            daemon = DaemonProcess(
                OUT_DIR, raw, emulator.env(), name=f"scaling-{tag}-{k + 1}of{len(urls)}", log_level="DEBUG"
            )
            stack.callback(_stop, daemon)
            fleet.append(daemon.start())
        for daemon in fleet:
            daemon.wait_started(START_TIMEOUT_SECONDS)
        release_paused(conn, stage, fleet)
        cpu0 = sum(d.cpu_seconds() for d in fleet)
        started = time.monotonic()
        _signal(fleet, signal.SIGCONT)
        _wait_drained(lambda: database.scalar(conn, done_sql), n, fleet, f"{tag} to drain")
        wall = time.monotonic() - started
        cpu = sum(d.cpu_seconds() for d in fleet) - cpu0
    rows, rate, span = flip_rate(conn, stage, batch * len(fleet))  # the fleet's first batches end together
    drain = Drain(rows, rate, span, wall, cpu, end_state(conn), totals(conn, stage))
    for daemon in fleet:
        _count_claims(daemon, drain)
    return drain


def release_paused(conn, stage: str, fleet: Sequence[DaemonProcess]) -> None:
    """Release the rows while every daemon is stopped (SIGSTOP), and stay stopped past one interval.

    An idle daemon polls once an interval, each at its own phase: released at once, the rows
    would be found by one daemon up to an interval before the others. Stopped for longer than an
    interval (and less than APScheduler's misfire grace, twice the interval), every daemon has a
    tick due when SIGCONT comes and runs it at once, so the whole fleet claims together. A daemon
    stopped inside a transaction could hold a row the release needs: the release then gives up
    after a second, the fleet runs a moment, and it is tried again.
    """
    interval = configs.jobs()[stage]["interval_seconds"]
    for _ in range(RELEASE_TRIES):
        _signal(fleet, signal.SIGSTOP)
        try:
            database.sql(conn, "SET SESSION innodb_lock_wait_timeout = 1")
            try:
                release(conn, stage)
            finally:
                database.sql(conn, "SET SESSION innodb_lock_wait_timeout = DEFAULT")
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != 1205:  # lock wait timeout
                raise
            _signal(fleet, signal.SIGCONT)
            time.sleep(0.3)
            continue
        time.sleep(interval * 1.25)
        return
    raise RuntimeError(f"{stage}: could not release the rows with the fleet stopped in {RELEASE_TRIES} tries")


def _signal(fleet: Sequence[DaemonProcess], signum: int) -> None:
    for daemon in fleet:
        os.kill(daemon.pid, signum)


def _stop(daemon: DaemonProcess) -> None:
    try:
        if daemon.alive:
            os.kill(daemon.pid, signal.SIGCONT)  # a stopped daemon would not see the SIGTERM
        daemon.stop()
    finally:
        daemon.close()


def _wait_drained(done: Callable[[], int], n: int, fleet: Sequence[DaemonProcess], what: str) -> None:
    stall = database.Stall(what, n, DRAIN_STALL_SECONDS)

    def drained() -> bool:
        count = done()
        stall.check(count, fleet[0].log_path)
        return count >= n

    wait_until(drained, DRAIN_TIMEOUT_SECONDS, what, interval=0.2, daemons=fleet, error=RuntimeError)


def _count_claims(daemon: DaemonProcess, drain: Drain) -> None:
    """Lost claims, other rolled-back batches and deferred rows, from one daemon's JSON log."""
    records = parse_records(daemon.log_path.read_text(encoding="utf-8", errors="replace").splitlines())
    lost_at = None
    for record in records:
        action, at = record.get("action"), datetime.fromisoformat(record["time"]).timestamp()
        if action == "batch":
            # A batch that lost at COMMIT (Galera's certification) still logs its counts right after
            # its batch_aborted record: those rows were rolled back, not deferred.
            if lost_at is None or at - lost_at > LOST_BATCH_LOG_SECONDS:
                drain.deferred += int(record.get("later", 0))
            lost_at = None
        elif action == "batch_aborted":
            message = record.get("message", "")
            if "LostClaim" in message or " 1213" in message:
                drain.lost += 1
                lost_at = at
            else:
                drain.aborted += 1


# --- the hand-written loop ---------------------------------------------------------------------


class HandLoopError(RuntimeError):
    """The hand loop met a row outside the seeded happy path it implements."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise HandLoopError(message)


def _marks(values: Sequence) -> str:
    return ", ".join(["%s"] * len(values))


def _insert(cur, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """One multi-row INSERT, as PyMySQL's executemany rewrites the daemon's."""
    row = "(" + _marks(columns) + ")"
    cur.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * len(rows)),
        [v for r in rows for v in r],
    )


def _whens(pairs: dict) -> tuple[str, list]:
    return " ".join(["WHEN %s THEN %s"] * len(pairs)), [v for pair in pairs.items() for v in pair]


REFUND_COLUMNS = (
    "order_id",
    "req_id",
    "refund_seq",
    "out_refund_no",
    "out_trade_no",
    "transaction_id",
    "refund_amount",
    "total_amount",
    "reason",
    "submit_scanned",
    "submit_success",
    "progress_scanned",
    "progress_success",
    "sync_scanned",
    "sync_success",
    "attempts",
    "next_attempt_at",
    "submit_sent",
    "channel",
    "quantity",
    "part",
    "goods_scanned",
    "goods_success",
    "goods_attempts",
)
OPLOG_COLUMNS = ("order_id", "event", "detail")


def _log(cur, events: Sequence[tuple[int, str, str]]) -> None:
    """The oplog's events, after the daemon's look for any already there (scanners/shop.py: log_events)."""
    order_ids, names = sorted({e[0] for e in events}), sorted({e[1] for e in events})
    cur.execute(
        f"SELECT order_id, event FROM goods_order2_oplog WHERE order_id IN ({_marks(order_ids)}) "
        f"AND event IN ({_marks(names)})",
        [*order_ids, *names],
    )
    _expect(not cur.fetchall(), "oplog: an event already logged")
    _insert(cur, "goods_order2_oplog", OPLOG_COLUMNS, events)


def hand_intake(cur, now, limit: int) -> int:
    cur.execute(
        "SELECT id, order_id, op_type, operator, reason, quantity, attempts FROM req_order_ops "
        "WHERE scanned = %s AND success = %s AND (next_attempt_at IS NULL OR next_attempt_at <= %s) "
        "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (0, 0, now, limit),
    )
    requests = cur.fetchall()
    if not requests:
        return 0
    order_ids = sorted({r[1] for r in requests})
    cur.execute(
        "SELECT id, order_no, pay_status, transaction_id, paid_at, order_status, total_amount, is_deleted, cancel_requested_at, "
        f"close_scanned, close_success, channel, quantity, cancelled_quantity FROM goods_order2 WHERE id IN ({_marks(order_ids)}) FOR UPDATE SKIP LOCKED",
        order_ids,
    )
    orders = {row[0]: row for row in cur.fetchall()}
    cur.execute(
        f"SELECT order_id FROM req_order_ops WHERE order_id IN ({_marks(order_ids)}) AND success = %s", [*order_ids, 1]
    )
    _expect(
        len(orders) == len(order_ids) == len(requests) and not cur.fetchall(),
        "intake: orders busy, missing or asked twice",
    )
    for table in ("refund_order", "refund_order_archive"):  # numbering and WeChat's 50: none refunded yet
        cur.execute(
            f"SELECT order_id, COUNT(*) AS count_1, MAX(refund_seq) AS max_1 FROM {table} "
            f"WHERE order_id IN ({_marks(order_ids)}) GROUP BY order_id",
            order_ids,
        )
        _expect(not cur.fetchall(), "intake: an order refunded before")
    by_source: dict[str, list[int]] = defaultdict(list)
    refunds, events = [], []
    for req_id, order_id, op_type, operator, reason, quantity, _attempts in requests:
        (
            _,
            order_no,
            pay_status,
            transaction_id,
            paid_at,
            status,
            amount,
            deleted,
            asked,
            _cs,
            _cok,
            channel,
            units,
            done,
        ) = orders[order_id]
        _expect(
            op_type in CANCEL_SOURCES
            and status == "PAID"
            and pay_status == 1
            and not deleted
            and asked is None
            and amount
            and transaction_id
            and quantity is None
            and done == 0
            and now - paid_at <= REFUND_WINDOW,
            f"intake: order {order_id} not a plain paid order",
        )
        source = CANCEL_SOURCES[op_type]
        by_source[source].append(order_id)
        refunds.append(
            (
                order_id,
                req_id,
                1,
                out_refund_no_for(order_id),
                order_no,
                transaction_id,
                amount,
                amount,
                wechat_reason(reason, source),
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                now,
                0,
                channel,
                units,
                0,
                0,
                0,
                0,
            )
        )
        events.append((order_id, "CANCELLED", f"req {req_id} {op_type} by {operator or '-'}"))
    for source in sorted(by_source):
        ids = by_source[source]
        changed = cur.execute(
            "UPDATE goods_order2 SET order_status=%s, cancel_source=%s, refund_status=%s, cancelled_at=%s, "
            "cancelled_quantity=quantity, "
            f"updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(ids)}) AND order_status = %s AND is_deleted = %s",
            ["CANCELLED", source, "REFUNDING", now, *ids, "PAID", 0],
        )
        _expect(changed == len(ids), f"intake: {len(ids)} orders locked, {changed} cancelled")
    _insert(cur, "refund_order", REFUND_COLUMNS, refunds)
    _log(cur, events)
    ids = [r[0] for r in requests]
    flipped = cur.execute(
        "UPDATE req_order_ops SET scanned=%s, success=%s, result_code=%s, result_msg=%s, scanned_at=%s, attempts=%s, "
        f"next_attempt_at=%s, last_error=%s, updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(ids)}) AND scanned = %s",
        [1, 1, "OK", ACCEPTED_PAID, now, 0, None, None, *ids, 0],
    )
    _expect(flipped == len(ids), f"intake: {len(ids)} claimed, {flipped} flipped")
    return len(ids)


def hand_sync_result(cur, now, limit: int) -> int:
    cur.execute(
        "SELECT id, order_id, refund_seq, out_refund_no, refund_amount, wx_status, progress_success, success_time, attempts, "
        "last_error, part FROM refund_order WHERE progress_scanned = %s AND sync_scanned = %s AND sync_success = %s "
        "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (1, 0, 0, limit),
    )
    refunds = cur.fetchall()
    if not refunds:
        return 0
    order_ids = sorted({r[1] for r in refunds})
    cur.execute(
        f"SELECT id, refund_status FROM goods_order2 WHERE id IN ({_marks(order_ids)}) FOR UPDATE SKIP LOCKED",
        order_ids,
    )
    orders = dict(cur.fetchall())
    _expect(len(orders) == len(order_ids) == len(refunds), "sync_result: orders busy, missing or refunded twice")
    refunded, events = {}, []
    amounts: dict[int, int] = {}
    for (
        _id,
        order_id,
        refund_seq,
        out_refund_no,
        amount,
        wx_status,
        progress_success,
        success_time,
        _a,
        _e,
        part,
    ) in refunds:
        _expect(
            orders[order_id] == "REFUNDING"
            and progress_success == 1
            and wx_status == "SUCCESS"
            and refund_seq == 1
            and not part,
            f"sync_result: refund of order {order_id} is not a first refund that succeeded",
        )
        refunded[order_id] = success_time or now
        amounts[order_id] = amount
        events.append((order_id, "REFUND_SUCCEEDED", f"{out_refund_no} {amount} fen"))
    whens, params = _whens(refunded)
    ids = list(refunded)
    changed = cur.execute(
        f"UPDATE goods_order2 SET refund_status=%s, wx_progress_scanned=%s, refunded_at=CASE id {whens} END, "
        f"updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(ids)}) AND refund_status = %s",
        ["REFUNDED", 1, *params, *ids, "REFUNDING"],
    )
    _expect(changed == len(ids), f"sync_result: {len(ids)} orders locked, {changed} refunded")
    whens, params = _whens(amounts)
    cur.execute(
        f"UPDATE goods_order2 SET refunded_amount=(refunded_amount + CASE id {whens} ELSE %s END), "
        f"updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(list(amounts))})",
        [*params, 0, *amounts],
    )
    _log(cur, events)
    ids = [r[0] for r in refunds]
    flipped = cur.execute(
        "UPDATE refund_order SET sync_scanned=%s, sync_success=%s, attempts=%s, next_attempt_at=%s, last_error=%s, "
        f"updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(ids)}) AND sync_scanned = %s",
        [1, 1, 0, None, None, *ids, 0],
    )
    _expect(flipped == len(ids), f"sync_result: {len(ids)} claimed, {flipped} flipped")
    return len(ids)


@dataclass(frozen=True)
class GoodsMove:
    """restore_stock / decrement_sales by hand: their claim, the goods column, which way, the oplog event."""

    flag: str  # stock | sales: the flag columns' prefix
    column: str
    sign: int
    event: str
    claim: str
    claim_params: tuple
    fits: Callable[[int, int], bool]  # (current value, signed delta) -> may move


GOODS_MOVES = {
    "restore_stock": GoodsMove(
        "stock",
        "stock",
        +1,
        "STOCK_RESTORED",
        "SELECT id, goods_id, CAST(quantity AS SIGNED INTEGER) - CAST(parts_quantity AS SIGNED INTEGER) AS quantity, stock_attempts FROM goods_order2 WHERE stock_scanned = %s AND stock_success = %s "
        "AND order_status = %s AND refund_status IN (%s, %s) AND is_deleted = %s AND (pay_status = %s AND refund_status = %s "
        "OR pay_status = %s AND refund_status = %s) AND (stock_next_attempt_at IS NULL OR stock_next_attempt_at <= %s) "
        "ORDER BY refund_status, id LIMIT %s FOR UPDATE SKIP LOCKED",
        (0, 0, "CANCELLED", "NONE", "REFUNDED", 0, 1, "REFUNDED", 0, "NONE"),
        lambda value, delta: value + delta <= UINT_MAX,
    ),
    "decrement_sales": GoodsMove(
        "sales",
        "sales",
        -1,
        "SALES_DECREMENTED",
        "SELECT id, goods_id, CAST(quantity AS SIGNED INTEGER) - CAST(parts_quantity AS SIGNED INTEGER) AS quantity, sales_attempts FROM goods_order2 WHERE sales_scanned = %s AND sales_success = %s "
        "AND order_status = %s AND refund_status = %s AND is_deleted = %s AND pay_status = %s "
        "AND (sales_next_attempt_at IS NULL OR sales_next_attempt_at <= %s) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (0, 0, "CANCELLED", "REFUNDED", 0, 1),
        lambda value, delta: value + delta >= 0,
    ),
}


def hand_goods_move(move: GoodsMove, cur, now, limit: int) -> int:
    cur.execute(move.claim, (*move.claim_params, now, limit))
    rows = cur.fetchall()
    if not rows:
        return 0
    goods_ids = sorted({r[1] for r in rows})
    cur.execute(f"SELECT id, {move.column} FROM goods WHERE id IN ({_marks(goods_ids)})", goods_ids)
    current = dict(cur.fetchall())
    ids = [r[0] for r in rows]
    deltas: dict[int, int] = defaultdict(int)
    events = []
    for order_id, goods_id, quantity, _attempts in rows:
        delta = move.sign * quantity
        _expect(
            goods_id in current and move.fits(current[goods_id] + deltas[goods_id], delta),
            f"{move.event}: goods {goods_id} missing or out of range",
        )
        deltas[goods_id] += delta
        events.append((order_id, move.event, f"goods {goods_id} {delta:+d}"))
    cur.execute(
        f"SELECT order_id FROM goods_order2_oplog WHERE order_id IN ({_marks(ids)}) AND event = %s", [*ids, move.event]
    )
    _expect(not cur.fetchall(), f"{move.event}: already logged")
    _insert(cur, "goods_order2_oplog", OPLOG_COLUMNS, events)
    f = move.flag
    flipped = cur.execute(
        f"UPDATE goods_order2 SET {f}_scanned=%s, {f}_success=%s, {f}_attempts=%s, {f}_next_attempt_at=%s, {f}_last_error=%s, "
        f"updated_at=CURRENT_TIMESTAMP(3) WHERE id IN ({_marks(ids)}) AND {f}_scanned = %s",
        [1, 1, 0, None, None, *ids, 0],
    )
    _expect(flipped == len(ids), f"{move.event}: {len(ids)} claimed, {flipped} flipped")
    locking = sorted(deltas)
    cur.execute(
        f"SELECT id, {move.column} FROM goods WHERE id IN ({_marks(locking)}) ORDER BY id FOR UPDATE SKIP LOCKED",
        locking,
    )
    held = dict(cur.fetchall())
    _expect(
        len(held) == len(deltas) and all(move.fits(held[g], d) for g, d in deltas.items()),
        f"{move.event}: goods busy or moved",
    )
    whens, params = _whens(deltas)
    cur.execute(
        f"UPDATE goods SET {move.column}=({move.column} + CASE id {whens} ELSE %s END), updated_at=CURRENT_TIMESTAMP(3) "
        f"WHERE id IN ({_marks(list(deltas))})",
        [*params, 0, *deltas],
    )
    return len(ids)


HAND_BATCH: dict[str, Callable] = {
    "intake": hand_intake,
    "sync_result": hand_sync_result,
    "restore_stock": lambda cur, now, limit: hand_goods_move(GOODS_MOVES["restore_stock"], cur, now, limit),
    "decrement_sales": lambda cur, now, limit: hand_goods_move(GOODS_MOVES["decrement_sales"], cur, now, limit),
}


def hand_connect(server, name: str) -> pymysql.connections.Connection:
    """A connection with the daemon's session settings (UTC, READ COMMITTED, its lock wait), autocommit off."""
    conn = pymysql.connect(
        host="127.0.0.1",
        port=server.port,
        user="root",
        password="",
        database=name,
        charset="utf8mb4",
        autocommit=False,
        connect_timeout=5,
        read_timeout=600,
        write_timeout=600,
        init_command=f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_SECONDS}",
    )
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    conn.commit()
    return conn


def hand_batch(conn, stage: str, limit: int) -> int:
    """One batch: the database's clock, the stage's statements, one COMMIT."""
    with conn.cursor() as cur:
        cur.execute("SELECT UTC_TIMESTAMP(3)")
        now = cur.fetchone()[0]
        claimed = HAND_BATCH[stage](cur, now, limit)
    conn.commit()
    return claimed


def drain_by_hand(server, name: str, conn, stage: str, batch: int) -> Drain:
    hand = hand_connect(server, name)
    try:
        release(conn, stage)
        started, cpu0 = time.monotonic(), time.process_time()
        while hand_batch(hand, stage, batch):
            pass
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
    finally:
        hand.close()
    rows, rate, span = flip_rate(conn, stage, batch)
    return Drain(rows, rate, span, wall, cpu, end_state(conn), totals(conn, stage))


# --- the statements on the wire ----------------------------------------------------------------


@contextmanager
def wire() -> Iterator[list[tuple[int, str]]]:
    """Every command this process's PyMySQL connections send, as (command, text), while the block runs."""
    sent: list[tuple[int, str]] = []
    original = pymysql.connections.Connection._execute_command

    def record(self, command, sql):
        sent.append((command, sql.decode("utf-8", "replace") if isinstance(sql, (bytes, bytearray)) else sql))
        return original(self, command, sql)

    pymysql.connections.Connection._execute_command = record
    try:
        yield sent
    finally:
        pymysql.connections.Connection._execute_command = original


FRAMEWORK_ONLY = re.compile(r"^(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK)\b", re.I)


def shape(sql: str) -> str:
    """A statement without its literals, table qualifiers, list lengths and spacing: what two senders must share."""
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "?", sql)  # strings (PyMySQL escapes with backslashes)
    s = re.sub(r"\b[A-Za-z_]\w*\.(?=[A-Za-z_])", "", s)  # table.column -> column
    s = re.sub(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", "?", s)  # numbers
    s = re.sub(r"\s*([(),=<>+?])\s*", r"\1", re.sub(r"\s+", " ", s)).strip()
    s = re.sub(r"\((?:\?,)*\?\)", "(?)", s)  # IN lists, VALUES rows
    s = re.sub(r"\(\?\)(?:,\(\?\))+", "(?)", s)  # many VALUES rows
    s = re.sub(r"(?:WHEN\?THEN\?)+", "WHEN?THEN?", s)  # CASE id WHEN .. THEN ..
    return s.upper()


def readable(command: int, sql: str, width: int = 240) -> str:
    """One wire command for --show-statements: lists shortened, then cut at ``width`` characters."""
    if command == pymysql.constants.COMMAND.COM_PING:
        return "[ping]"
    s = re.sub(r"\s+", " ", sql).strip()
    s = re.sub(r"\((?:[^()',]+, ){8,}[^()',]+\)", lambda m: f"(<{m.group(0).count(',') + 1} values>)", s)
    s = re.sub(r"(?:WHEN \S+ THEN \S+ ?){4,}", lambda m: f"WHEN .. THEN .. <x{m.group(0).count('WHEN')}> ", s)
    return s if len(s) <= width else f"{s[:width]} ... <{len(s):,} characters>"


@dataclass
class Batch:
    """One batch as sent: the stage's statements (compared) and what only the framework sends."""

    commands: list[tuple[int, str]]
    statements: list[str] = field(default_factory=list)
    framework: list[str] = field(default_factory=list)

    def framework_summary(self) -> str:
        """What only the framework sent, with counts: "[ping] x2, ROLLBACK x2, SAVEPOINT"."""
        counts = Counter(self.framework)
        return ", ".join(f"{what} x{k}" if k > 1 else what for what, k in counts.items()) or "-"

    def __post_init__(self) -> None:
        for command, sql in self.commands:
            if command != pymysql.constants.COMMAND.COM_QUERY:
                self.framework.append(readable(command, sql))
            elif FRAMEWORK_ONLY.match(sql.strip()):
                self.framework.append(FRAMEWORK_ONLY.match(sql.strip()).group(1).upper())
            else:
                self.statements.append(sql)


def capture_batches(bench: database.Bench, stage: str, batch: int) -> tuple[Batch, Batch]:
    """One batch of a Runner in this process (the daemon's code) and one of the hand loop, on the wire."""
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    name = f"scal_wire_{stage}"
    url, engine = bench.database(name)
    conn = bench.connect(name)
    seed.ready_for(conn, stage, 3 * batch)
    config = configs.sandbox(url, configs.jobs(enabled=[stage]))
    runner = Runner(engine, config, build_stages(config), None)
    hand = hand_connect(bench.server, name)
    try:
        runner.run_stage(stage)  # connects and warms up: not captured
        with wire() as sent:
            report = runner.run_stage(stage)
        _expect(
            report.claimed == batch and report.done == batch,
            f"{stage}: the captured Runner batch did {report.counts()}",
        )
        daemon = Batch(list(sent))
        with wire() as sent:
            claimed = hand_batch(hand, stage, batch)
        _expect(claimed == batch, f"{stage}: the captured hand batch claimed {claimed}")
        return daemon, Batch(list(sent))
    finally:
        hand.close()
        runner.close()
        engine.dispose()
        conn.close()
        bench.drop(name)


def compare_statements(stage: str, daemon: Batch, hand: Batch, show: bool) -> None:
    ours, theirs = [shape(s) for s in hand.statements], [shape(s) for s in daemon.statements]
    if show:
        print(f"\n[{stage}] one batch of the daemon's stage (a Runner in this process), as sent:")
        for command, sql in daemon.commands:
            print(f"  {readable(command, sql)}")
        print(f"[{stage}] one batch of the hand loop, as sent:")
        for command, sql in hand.commands:
            print(f"  {readable(command, sql)}")
    if ours != theirs:
        lines = [
            f"  {'=' if a == b else '!'} daemon: {a}\n    hand:   {b}"
            for a, b in zip(theirs + [""] * len(ours), ours + [""] * len(theirs))
            if a or b
        ]
        raise SystemExit(f"FAILED: {stage}: the hand loop does not send the daemon's statements:\n" + "\n".join(lines))


# --- the cluster -------------------------------------------------------------------------------


def cluster_database(cluster: galera.GaleraCluster, name: str) -> tuple[list[str], pymysql.connections.Connection]:
    """A fresh database with the schema, created through node 0; the URL per node and a counting connection on node 0."""
    node0 = cluster.nodes[0]
    node0.drop_database(name)
    cluster.create_database(name)
    engine = make_engine(cluster.url_for(0, name))
    try:
        init_schema(engine)
    finally:
        engine.dispose()
    conn = node0.connect(name, read_timeout=600, write_timeout=600)
    database.sql(conn, "SET time_zone = '+00:00'")
    database.sql(conn, "SET SESSION wsrep_sync_wait = 1")  # counts see what every node committed before
    return [cluster.url_for(i, name) for i in range(len(cluster.nodes))], conn


def settle_nodes(cluster: galera.GaleraCluster, name: str, stage: str, n: int) -> None:
    """Every node has applied the seed, has fresh statistics and purged: daemon k starts where daemon 0 does."""
    table = SPECS[stage].table
    for node in cluster.nodes:
        conn = node.connect(name, read_timeout=600)
        try:
            database.sql(conn, "SET SESSION wsrep_sync_wait = 1")
            seen = database.scalar(conn, f"SELECT COUNT(*) FROM {table}")
            if seen < n:
                raise RuntimeError(f"{node.name} sees {seen} of {n} seeded rows of {table}")
            seed.analyze(conn)
            database.wait_for_purge(conn)
        finally:
            conn.close()


def cert_failures(cluster: galera.GaleraCluster) -> int:
    """Certification failures and brute-force aborts, summed over the nodes."""
    return sum(
        int(cluster.status(i, name) or 0)
        for i in range(len(cluster.nodes))
        for name in ("wsrep_local_cert_failures", "wsrep_local_bf_aborts")
    )


# --- the run -----------------------------------------------------------------------------------


def checked(stage: str, where: str, k: int, drain: Drain, reference: Drain, more: str) -> Drain:
    """``k`` daemons' drain on the ``where`` (server, cluster), checked against ``reference`` and said."""
    check_same(f"{stage}, {k} daemon(s) on the {where}", drain, reference)
    print(
        f"[{stage}] {where}, {k} daemon(s): {reporting.fmt(drain.rate)} rows/s, lost claims {drain.lost}, {more}",
        flush=True,
    )
    return drain


def run_server(bench, emulator, stage: str, n: int, batch: int) -> tuple[Drain, dict[int, Drain]]:
    """The hand loop, then 1, 2 and 3 daemons, each on a fresh copy of the same seeded rows."""
    name = f"scal_{stage}_hand"
    _url, _engine = bench.database(name)
    conn = bench.connect(name)
    seed_held(conn, stage, n)
    print(f"[{stage}] server: hand loop", flush=True)
    hand = drain_by_hand(bench.server, name, conn, stage, batch)
    conn.close()
    bench.drop(name)
    _expect(hand.rows == n and hand.totals["done"] == n, f"{stage}: the hand loop did {hand.totals['done']} of {n}")
    print(f"[{stage}] server: hand loop {reporting.fmt(hand.rate)} rows/s", flush=True)
    fleets = {}
    for k in FLEETS:
        name = f"scal_{stage}_server_{k}"
        url, _engine = bench.database(name)
        conn = bench.connect(name)
        seed_held(conn, stage, n)
        drain = drain_with_daemons(emulator, [url] * k, conn, stage, n, batch, f"{stage}-server")
        conn.close()
        bench.drop(name)
        fleets[k] = checked(stage, "server", k, drain, hand, f"deferred rows {drain.deferred}")
    return hand, fleets


def run_cluster(cluster, emulator, stage: str, n: int, batch: int, reference: Drain) -> dict[int, Drain]:
    fleets = {}
    for k in FLEETS:
        name = f"scal_{stage}_cluster_{k}"
        urls, conn = cluster_database(cluster, name)
        seed_held(conn, stage, n)
        settle_nodes(cluster, name, stage, n)
        before = cert_failures(cluster)
        drain = drain_with_daemons(emulator, urls[:k], conn, stage, n, batch, f"{stage}-cluster")
        drain.cert_failures = cert_failures(cluster) - before
        database.sql(conn, f"DROP DATABASE {name}")
        conn.close()
        fleets[k] = checked(stage, "cluster", k, drain, reference, f"cert failures {drain.cert_failures}")
    return fleets


def scaling_row(stage: str, setup: str, fleets: dict[int, Drain]) -> list:
    rates = [fleets[k].rate for k in FLEETS]
    per = lambda attr: " / ".join(str(getattr(fleets[k], attr)) for k in FLEETS)  # noqa: E731
    cert = per("cert_failures") if setup == "cluster" else None
    return [
        stage,
        setup,
        *rates,
        reporting.ratio(rates[1], rates[0]),
        reporting.ratio(rates[2], rates[0]),
        per("lost"),
        per("deferred"),
        cert,
        " / ".join(f"{fleets[k].cpu * 1e6 / fleets[k].rows:.0f}" for k in FLEETS),
    ]


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="rows per stage and measurement (default 30,000; --quick 3,000)")
    seed.stages_option(p)
    p.add_argument("--no-cluster", action="store_true", help="only the single server (no Galera cluster)")
    p.add_argument(
        "--show-statements",
        action="store_true",
        help="print one batch of each stage as the daemon and the hand loop send it",
    )
    args = reporting.arguments(p)
    n = reporting.size(args, "n", quick=3_000, full=30_000)
    stages = seed.chosen_stages(p, args)
    cluster_missing = None if args.no_cluster else galera.missing()
    with_cluster = not args.no_cluster and cluster_missing is None
    where = "one server and a 3-node Galera cluster" if with_cluster else "one server"
    report = reporting.Report(
        f"Scaling: database stages with 1, 2 and 3 daemons, {n:,} rows each, on {where}; hand-written loop"
    )

    hands: dict[str, Drain] = {}
    server: dict[str, dict[int, Drain]] = {}
    wire_counts: dict[str, tuple[Batch, Batch]] = {}
    with EmulatorProcess(log_name="scaling-emulator") as emulator:
        with database.Bench(report=report) as bench:
            for stage in stages:
                batch = configs.jobs()[stage]["batch_size"]
                daemon_batch, by_hand = capture_batches(bench, stage, batch)
                compare_statements(stage, daemon_batch, by_hand, args.show_statements)
                wire_counts[stage] = (daemon_batch, by_hand)
                print(
                    f"\n[{stage}] the hand loop sends the daemon's {len(by_hand.statements)} statements per batch; "
                    f"seeding {n:,} rows per measurement",
                    flush=True,
                )
                hands[stage], server[stage] = run_server(bench, emulator, stage, n, batch)
        cluster_runs: dict[str, dict[int, Drain]] = {}
        if with_cluster:
            print("\nstarting the 3-node Galera cluster", flush=True)
            t = time.monotonic()
            with galera.GaleraCluster(3, name="cs-bench") as cluster:
                print(f"cluster up in {time.monotonic() - t:.0f} s", flush=True)
                for stage in stages:
                    cluster_runs[stage] = run_cluster(
                        cluster, emulator, stage, n, configs.jobs()[stage]["batch_size"], hands[stage]
                    )

    rows = []
    for stage in stages:
        rows.append(scaling_row(stage, "server", server[stage]))
        if stage in cluster_runs:
            rows.append(scaling_row(stage, "cluster", cluster_runs[stage]))
    report.table(
        f"Rows/s draining {n:,} rows, 1 / 2 / 3 daemons at once (cluster: daemon k on node k)",
        [
            "stage",
            "setup",
            "1 daemon",
            "2 daemons",
            "3 daemons",
            "2/1",
            "3/1",
            "lost claims 1/2/3",
            "deferred rows 1/2/3",
            "cert failures + BF aborts 1/2/3",
            "daemon CPU ms / 1k rows 1/2/3",
        ],
        rows,
    )
    overhead = []
    for stage in stages:
        hand, one = hands[stage], server[stage][1]
        daemon_batch, by_hand = wire_counts[stage]
        overhead.append(
            [
                stage,
                hand.rate,
                one.rate,
                reporting.ratio(hand.rate, one.rate),
                len(by_hand.commands),
                len(daemon_batch.commands),
                daemon_batch.framework_summary(),
                hand.cpu * 1e6 / hand.rows,
                one.cpu * 1e6 / one.rows,
                "same",
            ]
        )
    report.table(
        f"Framework overhead: the hand-written PyMySQL loop vs one daemon, {n:,} rows, one server",
        [
            "stage",
            "hand loop rows/s",
            "daemon rows/s",
            "hand / daemon",
            "commands / batch (hand)",
            "commands / batch (daemon)",
            "sent only by the daemon",
            "hand CPU ms / 1k rows",
            "daemon CPU ms / 1k rows",
            "end state",
        ],
        overhead,
    )
    for stage, hand_rate, daemon_rate, x, *_ in overhead:
        report.target(
            f"{stage}: hand loop / daemon",
            f"{reporting.fmt(x)} x ({reporting.fmt(hand_rate)} vs {reporting.fmt(daemon_rate)} rows/s)",
            f"<= {OVERHEAD_TARGET:.0f} x",
            None if x is None else x <= OVERHEAD_TARGET,
        )
    for row in rows:
        stage, setup, x2, x3 = row[0], row[1], row[5], row[6]
        for k, x in ((2, x2), (3, x3)):
            report.target(
                f"{stage}, {setup}: {k} daemons / 1",
                f"{reporting.fmt(x)} x",
                f">= {SCALING_TARGET} x",
                None if x is None else x >= SCALING_TARGET,
            )
    report.note(
        "rate = (rows - one batch per daemon) / (last updated_at - first updated_at) of the flipped rows, for the daemons and "
        "the hand loop alike (the fleet's first batches end together); the seeded rows are held back until every daemon of the fleet runs, then released in one UPDATE while "
        "the daemons are stopped (SIGSTOP) and continued together (SIGCONT) past one interval, so that all poll at once."
    )
    report.note(
        "what bounds these figures on this machine: 2 cores, shared. Every daemon, this process and MariaDB share them (on the "
        "cluster, three mariadbd processes and their replication too), so more daemons cannot add CPU: on one server a second "
        "daemon can only fill the time the first one waits on MariaDB, and a third only adds contention."
    )
    report.note(
        "on one server the daemons claim disjoint rows (FOR UPDATE SKIP LOCKED); restore_stock and decrement_sales then lock goods "
        "rows at the end of a batch, and the orders of a goods row another daemon holds wait a second (deferred rows, Later). On "
        "Galera, SKIP LOCKED sees only the node's own locks: daemons on different nodes claim the same rows, the first to commit "
        "wins certification and the others' batches fail with error 1213 and roll back whole (lost claims; cert failures are the "
        "nodes' own count), so each extra node mostly adds lost work."
    )
    report.note(
        "deferred rows: a row whose order (sync_result) or goods row (restore_stock, decrement_sales) another transaction held "
        "when the batch locked it (SKIP LOCKED) goes round again (Later) without an attempt spent. restore_stock and "
        "decrement_sales wait a second for it (next_attempt_at) plus up to one tick; sync_result's claim does not read "
        "next_attempt_at, so such a row is claimed again at once and can be deferred many times (its count can pass N). With "
        "--quick's 3,000 orders the optimizer reads all of goods_order2 for sync_result's order lock (500 of 3,000 ids) instead "
        "of the primary key, and that scan finds the other daemons' rows held: small tables defer far more than the default N. "
        "The seed gives order i goods 1 + i % 1,000, so orders i and i + 1,000 share a goods row: with 3 daemons the first and "
        "the third of three concurrent batches (500 orders each) lock the same 500 goods rows, and one of them is deferred whole."
    )
    report.note(
        "hand / daemon CPU: the client's CPU per 1,000 rows (this process for the hand loop, the daemons' for the fleets); "
        "the difference is the framework's Python per row and per statement (bench/stages.py --profile shows where). On two "
        "cores it competes with MariaDB for the same CPU, so it bounds the daemon's rows/s as much as the round trips do."
    )
    report.note(
        "the hand loop sends the stage's statements exactly (compared on the wire, literals aside); what only the daemon sends per "
        "batch is the framework's: a ping per pool checkout, the clock read in a transaction of its own, a ROLLBACK each time "
        "the pool takes a connection back (after that read and after the COMMIT), a SAVEPOINT around the stage's work, and CASE "
        "lists padded to a power of two. Every drain, hand loop and fleets, ended in the same "
        "state (flags, orders, refunds, oplog, goods stock and sales)."
    )
    aborted = [
        f"{stage} on the {setup}, {k} daemon(s): {drain.aborted}"
        for setup, runs in (("server", server), ("cluster", cluster_runs))
        for stage, fleets in runs.items()
        for k, drain in fleets.items()
        if drain.aborted
    ]
    if aborted:
        report.note(
            "batches rolled back for another reason than a lost race (a transient database error; see the daemons' "
            f"logs in bench/out/scaling-*.log): {'; '.join(aborted)}"
        )
    if cluster_missing:
        report.note(f"cluster not measured: this machine lacks {cluster_missing} (`bash scripts/test` installs it)")
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
