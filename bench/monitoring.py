"""Monitoring's cost: one metrics refresh and one `status` at 10,000 vs 5,000,000 orders, and the daemon's CPU with it on and off.

Two databases on one server: "small" with 10,000 orders and "big" with 5,000,000 (``--quick``:
500,000), almost all finished (every stage done: requests 1/1, refunds 1/1 at every step, orders
cancelled, refunded, stock and sales done), plus the same small backlog in both: 50 rows pending
for each of the seven stages (restore_stock and decrement_sales share their 50 orders), of which
5 ABNORMAL refunds in poll_refund, and 20 rows failed for good in submit_refund and in restore_stock.

1. One refresh: ``take_snapshot`` (what the daemon's watcher reads every ``refresh_seconds`` for
   the gauges, the alert rules and the status page) and one ``collect_status`` (the cheap default
   of `cancel-scanner status`), ``--reps`` times each after ``--warmup``, small and big interleaved;
   median and p95, and big / small. As a contrast, ``collect_status(totals=True)`` (`status
   --totals`: counts every finished row) once at each size.
2. EXPLAIN (and MariaDB's ANALYZE: rows read) of every statement one snapshot sends on "big",
   captured with a ``before_cursor_execute`` listener: verdict "index" unless some table is read
   by a full scan (type ALL) or a full index scan (type index).
3. The daemon (``cancel-scanner run``, jobs.yaml as shipped, against the emulator) idles on "big",
   ``--seconds`` per window, in the order off, on, on, off: with ``monitoring: {listen, refresh_seconds:
   15}`` and a scraper GETting /metrics every 15 s (as Prometheus does), and without. CPU seconds
   per minute of the daemon and of mariadbd, and the statements per minute the server served.
   The backlog is parked first (its retry clocks a day ahead; sync_result's 50, which have no
   retry clock, finished), so the daemon has nothing to do in either mode, as in idle.py.

Targets: a refresh at the big size under 50 ms (median); refresh and status flat (big / small <= 1.5).

    PYTHONPATH=. python bench/monitoring.py [--quick] [--orders 5000000] [--small-orders 10000] [--seconds 60]
"""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import OUT_DIR, configs, database, reporting, seed
from bench.emulator_server import EmulatorProcess
from testsupport.processes import DaemonProcess
from testsupport.waiting import wait_until

REFRESH_TARGET_MS = 50.0
FLAT_RATIO_TARGET = 1.5
FULL_SCANS = ("ALL", "index")
# One row per running daemon (each deletes its own at exit, survivors reap the dead): a scan of it is bounded.
BOUNDED_TABLES = ("cancel_scanner_process",)
COUNTERS = ("Questions", "Com_select", "Com_commit", "Com_rollback", "Com_update", "Com_insert")
REFRESH_SECONDS = 15  # monitoring.refresh_seconds in the daemon's run, and the scraper's interval
SCRAPE_SECONDS = 15.0
SETTLE_SECONDS = 6.0  # past start-up before a window opens: every stage has polled, the first refresh is done
TAKEOVER_SECONDS = 10

PENDING_PER_STAGE = 50
FAILED_PER_STAGE = 20
ABNORMAL_REFUNDS = 5


# --- the rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A run of order ids in one state; ``seed_rows(conn, lo, hi)`` writes the order, its request and its refund."""

    name: str
    rows: int
    seed_rows: Callable


def _finished(conn, lo: int, hi: int) -> None:
    seed.orders(conn, lo, hi, "finished")
    seed.requests(conn, lo, hi, "finished")
    seed.refunds(conn, lo, hi, "finished")


def _intake_pending(conn, lo: int, hi: int) -> None:
    seed.orders(conn, lo, hi, "paid")
    seed.requests(conn, lo, hi, "pending")


def _close_pending(conn, lo: int, hi: int) -> None:
    """Unpaid orders whose cancel intake accepted: close_unpaid settles the payment first."""
    seed.orders(conn, lo, hi, "paid")
    database.sql(
        conn,
        "UPDATE goods_order2 SET pay_status = 0, transaction_id = NULL, paid_at = NULL, order_status = 'UNPAID', "
        "cancel_source = 'MERCHANT', cancel_requested_at = NOW(3) - INTERVAL 5 MINUTE, "
        "created_at = NOW(3) - INTERVAL 1 HOUR WHERE id BETWEEN %s AND %s",
        (lo, hi),
    )
    seed.requests(conn, lo, hi, "finished")


def _refund_pending(state: str, order_state: str = "refunding") -> Callable:
    def seed_rows(conn, lo: int, hi: int) -> None:
        seed.orders(conn, lo, hi, order_state)
        seed.requests(conn, lo, hi, "finished")
        seed.refunds(conn, lo, hi, state)

    return seed_rows


def _poll_pending(conn, lo: int, hi: int) -> None:
    _refund_pending("poll")(conn, lo, hi)
    database.sql(
        conn,
        "UPDATE refund_order SET wx_status = 'ABNORMAL' WHERE id BETWEEN %s AND %s",
        (lo, lo + ABNORMAL_REFUNDS - 1),
    )


def _submit_failed(conn, lo: int, hi: int) -> None:
    _refund_pending("submit")(conn, lo, hi)
    database.sql(
        conn,
        "UPDATE refund_order SET submit_scanned = 1, submit_success = 0, attempts = 1, next_attempt_at = NULL, "
        "last_error = 'NOT_ENOUGH: the merchant account balance is insufficient' WHERE id BETWEEN %s AND %s",
        (lo, hi),
    )
    database.sql(conn, "UPDATE goods_order2 SET refund_status = 'FAILED' WHERE id BETWEEN %s AND %s", (lo, hi))


def _restore_failed(conn, lo: int, hi: int) -> None:
    _finished(conn, lo, hi)
    database.sql(
        conn,
        "UPDATE goods_order2 SET stock_success = 0, stock_attempts = 5, stock_last_error = 'goods row missing' "
        "WHERE id BETWEEN %s AND %s",
        (lo, hi),
    )


BACKLOG = (
    Block("intake pending", PENDING_PER_STAGE, _intake_pending),
    Block("close_unpaid pending", PENDING_PER_STAGE, _close_pending),
    Block("submit_refund pending", PENDING_PER_STAGE, _refund_pending("submit")),
    Block(f"poll_refund pending ({ABNORMAL_REFUNDS} ABNORMAL)", PENDING_PER_STAGE, _poll_pending),
    Block("sync_result pending", PENDING_PER_STAGE, _refund_pending("sync")),
    Block("restore_stock and decrement_sales pending", PENDING_PER_STAGE, _refund_pending("finished", "refunded")),
    Block("submit_refund failed", FAILED_PER_STAGE, _submit_failed),
    Block("restore_stock failed", FAILED_PER_STAGE, _restore_failed),
)
BACKLOG_ROWS = sum(b.rows for b in BACKLOG)


def seed_orders(conn, orders: int) -> dict[str, tuple[int, int]]:
    """``orders`` orders, the last BACKLOG_ROWS of them the backlog; the id range of each backlog block."""
    finished = orders - BACKLOG_ROWS
    seed.goods(conn)
    _finished(conn, 1, finished)
    ranges, lo = {}, finished + 1
    for block in BACKLOG:
        hi = lo + block.rows - 1
        block.seed_rows(conn, lo, hi)
        ranges[block.name] = (lo, hi)
        lo = hi + 1
    seed.analyze(conn)
    return ranges


def park_backlog(conn, first_backlog_id: int) -> None:
    """Nothing due for the idle daemon: the pending rows wait a day (still pending, now "waiting");
    sync_result's, which have no retry clock, end finished. The failed rows stay as they are."""
    later = "NOW(3) + INTERVAL 1 DAY"
    database.sql(
        conn, f"UPDATE req_order_ops SET next_attempt_at = {later} WHERE id >= %s AND scanned = 0", (first_backlog_id,)
    )
    database.sql(
        conn,
        f"UPDATE goods_order2 SET close_next_attempt_at = {later} WHERE id >= %s AND cancel_requested_at IS NOT NULL",
        (first_backlog_id,),
    )
    database.sql(
        conn,
        f"UPDATE goods_order2 SET stock_next_attempt_at = {later}, sales_next_attempt_at = {later} "
        "WHERE id >= %s AND stock_scanned = 0 AND order_status = 'CANCELLED'",
        (first_backlog_id,),
    )
    database.sql(
        conn,
        "UPDATE goods_order2 o JOIN refund_order r ON r.order_id = o.id "
        "SET o.refund_status = 'REFUNDED', o.wx_progress_scanned = 1, o.refunded_at = NOW(3), "
        "o.stock_scanned = 1, o.stock_success = 1, o.sales_scanned = 1, o.sales_success = 1, "
        "r.sync_scanned = 1, r.sync_success = 1 "
        "WHERE r.id >= %s AND r.progress_scanned = 1 AND r.sync_scanned = 0",
        (first_backlog_id,),
    )
    database.sql(
        conn,
        f"UPDATE refund_order SET next_attempt_at = {later} WHERE id >= %s AND "
        "((submit_scanned = 0 AND submit_success = 0) OR (submit_success = 1 AND progress_scanned = 0))",
        (first_backlog_id,),
    )


# --- 1, 2. one refresh, one status, their EXPLAIN -----------------------------------------------


def daemon_refresh(engine, stages: dict, now, lease_owner: tuple):
    """take_snapshot as the daemon's watcher takes it: with its owner and lease columns, so its leases are counted."""
    from cancel_scanner.monitoring.snapshot import take_snapshot

    owner, leases = lease_owner
    return take_snapshot(
        engine, stages, now, takeover_seconds=TAKEOVER_SECONDS, owner=owner, lease_columns=leases, wall_now=time.time()
    )


def time_refreshes(targets: dict, stages: dict, lease_owner: tuple, reps: int, warmup: int) -> dict:
    """Seconds per take_snapshot (without an owner; and as the daemon's watcher takes it, with ``lease_owner``:
    its owner and lease columns, so its leases are counted) and per collect_status, by (database, what);
    databases interleaved."""
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.status import collect_status
    from cancel_scanner.monitoring.snapshot import take_snapshot

    calls = {
        "refresh": lambda engine, now: take_snapshot(
            engine, stages, now, takeover_seconds=TAKEOVER_SECONDS, owner=None, wall_now=time.time()
        ),
        "daemon refresh": lambda engine, now: daemon_refresh(engine, stages, now, lease_owner),
        "status": lambda engine, now: collect_status(engine, stages, now),
    }
    times = {(db, what): [] for db in targets for what in calls}
    for rep in range(warmup + reps):
        for db, engine in targets.items():
            for what, call in calls.items():
                now = DbClock(engine)()  # the database's time, as the watcher and `status` read it first
                started = time.perf_counter()
                call(engine, now)
                took = time.perf_counter() - started
                if rep >= warmup:
                    times[(db, what)].append(took)
    return times


def time_totals(engine, stages: dict) -> tuple[float, dict]:
    """Seconds of one collect_status(totals=True), and the done rows it counted per stage."""
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.status import collect_status

    now = DbClock(engine)()
    started = time.perf_counter()
    status = collect_status(engine, stages, now, totals=True)
    return time.perf_counter() - started, {s.stage: s.done for s in status.stages}


def snapshot_statements(engine, stages: dict, lease_owner: tuple) -> list[tuple[str, object]]:
    """(SQL, parameters) of every statement one take_snapshot sends as the daemon takes it, as the DBAPI got them."""
    from sqlalchemy import event

    from cancel_scanner.engine.clock import DbClock

    now = DbClock(engine)()
    sent: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _executemany):
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        daemon_refresh(engine, stages, now, lease_owner)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return sent


def explain(conn, statement: str, params: object) -> tuple[list[dict], list[dict], str]:
    """EXPLAIN's and ANALYZE's rows of one statement, and the statement with its parameters in."""
    with conn.cursor() as cur:
        shown = cur.mogrify(statement, params)
    return (*database.explain(conn, statement, params), shown)


def summarize(sql_text: str, width: int = 110) -> str:
    """One line a reader can tell the query by: what it selects (shortened), from where, on what."""
    flat = re.sub(r"\s+", " ", sql_text).strip()
    m = re.match(r"SELECT (.*?) FROM (\S+)(.*)", flat, re.IGNORECASE)
    if not m:
        return flat[:width]
    columns, table, rest = m.groups()
    columns = columns if len(columns) <= 40 else columns[:37] + "..."
    rest = re.sub(rf"\b{re.escape(table)}\.", "", rest).strip()
    line = f"{columns} | {table} {rest}"
    return line if len(line) <= width else line[: width - 3] + "..."


# --- 3. the daemon with monitoring on and off ----------------------------------------------------


class Scraper:
    """GET /metrics every SCRAPE_SECONDS on a thread, as Prometheus would; keeps what the gauges said."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self.errors: list[str] = []
        self.refreshed: set[str] = set()  # cancel_scanner_gauges_refreshed_timestamp_seconds values seen
        self.last_body = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    body = response.read().decode("utf-8")
                self.scrapes += 1
                self.last_body = body
                for line in body.splitlines():
                    if line.startswith("cancel_scanner_gauges_refreshed_timestamp_seconds "):
                        self.refreshed.add(line.split()[1])
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(SCRAPE_SECONDS)


def listening_port(daemon: DaemonProcess) -> int:
    """The port monitoring.listen 127.0.0.1:0 got, from the daemon's "listening" log record."""
    found = wait_until(
        lambda: next((r["port"] for r in daemon.logs() if r.get("action") == "listening" and r.get("port")), None),
        30,
        f"{daemon.name} to listen",
        daemons=[daemon],
    )
    return int(found)


def idle_window(
    bench: database.Bench, conn, emulator: EmulatorProcess, url: str, monitoring: bool, seconds: float, life: int
) -> dict:
    """One life of the idle daemon: CPU and statements over a window of ``seconds`` past start-up."""
    raw = {"database_url": url, "wechat": emulator.wechat(), "jobs": configs.jobs()}
    if monitoring:
        raw["monitoring"] = {"listen": "127.0.0.1:0", "refresh_seconds": REFRESH_SECONDS}
    name = f"monitoring-{'on' if monitoring else 'off'}-{life}"
    scraped = {}
    with ExitStack() as stack:
        daemon = stack.enter_context(DaemonProcess(OUT_DIR, raw, emulator.env(), name=name))
        scraper = stack.enter_context(Scraper(listening_port(daemon))) if monitoring else None
        time.sleep(SETTLE_SECONDS)
        seen_before = set(scraper.refreshed) if scraper else set()
        spent = database.spent_while(conn, COUNTERS, daemon, bench.server, seconds)
        rss = daemon.memory_mb()
        if scraper:
            scraped = {
                "scrapes": scraper.scrapes,
                "errors": scraper.errors,
                "refreshes": len(scraper.refreshed - seen_before),
                "body": scraper.last_body,
            }
    return {
        "monitoring": monitoring,
        "seconds": spent.seconds,
        "per_minute": spent.per_minute,
        "daemon_cpu": spent.daemon_cpu,
        "server_cpu": spent.server_cpu,
        "rss": rss["VmRSS"],
        **scraped,
    }


def gauge(body: str, name: str, stage: str | None = None) -> str | None:
    prefix = f'{name}{{stage="{stage}"}} ' if stage else f"{name} "
    return next((line[len(prefix) :] for line in body.splitlines() if line.startswith(prefix)), None)


# --- the run -----------------------------------------------------------------------------------


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=None, help="orders, big (default 5,000,000; --quick 500,000)")
    p.add_argument("--small-orders", type=int, default=10_000, help="orders, small (default 10,000)")
    p.add_argument("--reps", type=int, default=20, help="timed refreshes and statuses per database (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed ones first (default 2)")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="each idle daemon window (default 60; --quick 30: a multiple of the 15 s refresh)",
    )
    p.add_argument("--skip-daemon", action="store_true", help="only the refresh, status and EXPLAIN measurements")
    args = reporting.arguments(p)
    big_orders = reporting.size(args, "orders", quick=500_000, full=5_000_000)
    small_orders = args.small_orders
    seconds = reporting.size(args, "seconds", quick=30.0, full=60.0)
    if small_orders <= BACKLOG_ROWS:
        p.error(f"--small-orders must exceed the backlog's {BACKLOG_ROWS} rows")
    report = reporting.Report(
        f"Monitoring: one refresh and `status` at {small_orders:,} vs {big_orders:,} orders; daemon CPU with it on and off"
    )

    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    with database.Bench(report=report) as bench:
        sizes = (small_orders, big_orders)
        both = bench.small_and_big(
            "bench_monitoring",
            sizes,
            seed_orders,
            lambda orders: f"{orders:,} orders ({BACKLOG_ROWS} of them the backlog)",
        )
        dbs = {label: (db.url, db.engine, db.conn) for label, db in both.items()}
        ranges = {label: db.result for label, db in both.items()}
        seeded = [f"{orders:,} orders in {db.seconds:.0f} s" for orders, db in zip(sizes, both.values(), strict=True)]
        config = configs.sandbox(dbs["small"][0])
        stages = build_stages(config)
        # The owner and lease columns the daemon's watcher passes (a Runner's own; never registered here).
        runner = Runner(dbs["small"][1], config, stages, None)
        lease_owner = (runner.owner, runner.lease_columns())
        runner.close()

        # 1. one refresh and one status, small vs big; then totals once each
        print(f"timing {args.reps} refreshes and statuses per database (after {args.warmup} warm-ups)", flush=True)
        times = time_refreshes(
            {label: engine for label, (_u, engine, _c) in dbs.items()}, stages, lease_owner, args.reps, args.warmup
        )
        totals = {}
        for label, (_url, engine, _conn) in dbs.items():
            print(f"[{label}] one status --totals", flush=True)
            totals[label] = time_totals(engine, stages)
        timing_rows = []
        for what, caption in (
            ("refresh", "one refresh (take_snapshot, owner=None)"),
            ("daemon refresh", "one refresh as the daemon takes it (its owner: + lease counts)"),
            ("status", "one status (collect_status)"),
        ):
            small, big = times[("small", what)], times[("big", what)]
            timing_rows.append(
                [
                    caption,
                    reporting.median(small) * 1000,
                    reporting.percentile(small, 95) * 1000,
                    reporting.median(big) * 1000,
                    reporting.percentile(big, 95) * 1000,
                    reporting.median(big) / reporting.median(small),
                ]
            )
        timing_rows.append(
            [
                "status --totals (totals=True), once",
                totals["small"][0] * 1000,
                None,
                totals["big"][0] * 1000,
                None,
                totals["big"][0] / totals["small"][0],
            ]
        )
        report.table(
            f"One refresh and one status, median and p95 of {args.reps} (after {args.warmup} warm-ups), ms",
            [
                "what",
                f"median at {small_orders:,}",
                f"p95 at {small_orders:,}",
                f"median at {big_orders:,}",
                f"p95 at {big_orders:,}",
                "ratio of medians",
            ],
            timing_rows,
        )
        done_big = totals["big"][1]
        report.note(
            "status --totals counted done rows at the big size: "
            + ", ".join(f"{stage} {n:,}" for stage, n in done_big.items())
        )

        # 2. EXPLAIN of every statement one snapshot sends, on big
        big_url, big_engine, big_conn = dbs["big"]
        sent = snapshot_statements(big_engine, stages, lease_owner)
        without_owner = len(snapshot_statements(big_engine, stages, (None, ())))
        plans, all_indexed, full_text = [], True, []
        for i, (statement, params) in enumerate(sent, 1):
            plan, analyzed, shown = explain(big_conn, statement, params)
            full_text.append(f"-- {i}\n{shown};\n")
            scans = [r for r in plan if r["type"] in FULL_SCANS]
            growing = [r for r in scans if r["table"] not in BOUNDED_TABLES]
            all_indexed &= not growing
            plans.append(
                [
                    i,
                    summarize(shown),
                    *database.plan_cells(plan, analyzed),
                    "FULL SCAN" if growing else "full scan, bounded: one row per running daemon" if scans else "index",
                ]
            )
        queries_path = OUT_DIR / "monitoring-snapshot-queries.sql"
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        queries_path.write_text("\n".join(full_text), encoding="utf-8")
        report.table(
            f"EXPLAIN of the {len(sent)} statements one refresh sends as the daemon takes it, at {big_orders:,} orders "
            f"(owner=None sends the first {without_owner}, not the lease counts after them; full text: bench/out/{queries_path.name})",
            ["#", "statement (columns | table and condition)", *database.PLAN_COLUMNS, "verdict"],
            plans,
        )

        # 3. the idle daemon on big, monitoring off / on / on / off
        windows = []
        if not args.skip_daemon:
            park_backlog(big_conn, min(lo for lo, _hi in ranges["big"].values()))
            database.wait_for_purge(big_conn)
            with EmulatorProcess(log_name="monitoring-emulator") as emulator:
                for life, monitoring in enumerate((False, True, True, False), 1):
                    print(f"idle daemon, monitoring {'on' if monitoring else 'off'}, {seconds:.0f} s", flush=True)
                    windows.append(idle_window(bench, big_conn, emulator, big_url, monitoring, seconds, life))
        for _url, _engine, conn in dbs.values():
            conn.close()

    if windows:
        modes = {m: [w for w in windows if w["monitoring"] == m] for m in (False, True)}

        def per_min(mode: bool, key: str, counter: str | None = None) -> float:
            ws = modes[mode]
            weights = [w["seconds"] for w in ws]
            values = [w["per_minute"][counter] if counter else w[key] for w in ws]
            return sum(v * s for v, s in zip(values, weights)) / sum(weights)

        figures = [
            ("daemon CPU seconds", "daemon_cpu", None),
            ("mariadbd CPU seconds", "server_cpu", None),
            *[(f"statements ({c})" if c == "Questions" else c, None, c) for c in COUNTERS],
        ]
        rows = [
            [
                label,
                per_min(False, key, c),
                per_min(True, key, c),
                reporting.ratio(per_min(True, key, c), per_min(False, key, c)),
            ]
            for label, key, c in figures
        ]
        rows.append(
            [
                "daemon RSS MB (end of window)",
                max(w["rss"] for w in modes[False]),
                max(w["rss"] for w in modes[True]),
                reporting.ratio(max(w["rss"] for w in modes[True]), max(w["rss"] for w in modes[False])),
            ]
        )
        report.table(
            f"Idle daemon on {big_orders:,} orders, per minute: monitoring off vs on (refresh_seconds {REFRESH_SECONDS}, "
            f"/metrics scraped every {SCRAPE_SECONDS:.0f} s); windows of {seconds:.0f} s in the order off, on, on, off",
            ["figure (per minute)", "monitoring off", "monitoring on", "on / off"],
            rows,
        )
        report.table(
            "Each window",
            [
                "#",
                "monitoring",
                "seconds",
                "daemon CPU s/min",
                "mariadbd CPU s/min",
                "statements/min",
                "refreshes the scraper saw",
                "scrapes",
            ],
            [
                [
                    i,
                    "on" if w["monitoring"] else "off",
                    w["seconds"],
                    w["daemon_cpu"],
                    w["server_cpu"],
                    w["per_minute"]["Questions"],
                    w.get("refreshes"),
                    w.get("scrapes"),
                ]
                for i, w in enumerate(windows, 1)
            ],
        )
        on_body = modes[True][-1]["body"]
        shown = {stage: gauge(on_body, "cancel_scanner_pending_rows", stage) for stage in stages}
        report.note(
            "the last scrape's cancel_scanner_pending_rows: "
            + ", ".join(f"{s} {v}" for s, v in shown.items())
            + f"; cancel_scanner_abnormal_refunds {gauge(on_body, 'cancel_scanner_abnormal_refunds')}"
        )
        errors = [e for w in modes[True] for e in w["errors"]]
        if errors:
            report.note(f"scrape errors: {len(errors)}, first: {errors[0]}")
        extra = per_min(True, "", "Questions") - per_min(False, "", "Questions")
        report.note(
            f"monitoring adds {extra:.0f} statements per minute, {extra * REFRESH_SECONDS / 60:.0f} per refresh at "
            f"{60 / REFRESH_SECONDS:.0f} refreshes a minute (the daemon's snapshot sends {len(sent)}, "
            "and the watcher reads the clock and ends each connection's transaction); a scrape reads no table"
        )

    big_refresh = reporting.median(times[("big", "refresh")]) * 1000
    report.target(
        f"one refresh at {big_orders:,} orders",
        f"median {big_refresh:.1f} ms",
        f"< {REFRESH_TARGET_MS:.0f} ms",
        big_refresh < REFRESH_TARGET_MS,
    )
    daemon_refresh = reporting.median(times[("big", "daemon refresh")]) * 1000
    report.target(
        f"one refresh as the daemon takes it at {big_orders:,} orders",
        f"median {daemon_refresh:.1f} ms",
        f"< {REFRESH_TARGET_MS:.0f} ms",
        daemon_refresh < REFRESH_TARGET_MS,
    )
    for row, what in zip(timing_rows[:3], ("refresh", "refresh as the daemon takes it", "status")):
        report.target(
            f"{what} flat: {big_orders:,} vs {small_orders:,}",
            f"{row[5]:.2f} x (medians)",
            f"<= {FLAT_RATIO_TARGET} x",
            row[5] <= FLAT_RATIO_TARGET,
        )
    report.target(
        "no statement of a refresh scans a table that grows with the orders",
        "all use an index" if all_indexed else "a full scan (see table)",
        "index for every such statement",
        all_indexed,
    )
    report.note(
        "Seeded " + "; ".join(seeded) + " (INSERT ... SELECT from seq_*; goods_order2, req_order_ops and refund_order, "
        "ids shared; goods_order2_oplog is not seeded: nothing monitoring reads). Backlog, the same at both sizes: "
        + ", ".join(f"{b.name} {b.rows}" for b in BACKLOG)
        + ". The time of a refresh excludes reading the database's clock (one SELECT before each call)."
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
