"""`cancel-scanner prune` moving 1,000,000 finished orders' rows while the shop and merchants write.

One fresh database per batch size (``--batch-sizes``, default 500 and 2,000): ``--rows`` finished
orders, each with an accepted request, a refund done at every stage and an oplog event, all
created and last changed 100 days ago (``--rows`` rows in each of req_order_ops, refund_order and
goods_order2_oplog). A writer on its own autocommit connection inserts, every ``--gap-ms`` ms,
alternately an order (goods_order2, as the shop's order system) and a cancel request
(req_order_ops, as a merchant's tool): first ``--idle-seconds`` alone, then while
`cancel-scanner prune --older-than 90d --batch-size N` runs in a subprocess (the operator's
command, so its Python never shares a GIL with the writer), then ``--after-seconds`` while
InnoDB purges what prune deleted.

Reported: rows per second per table and in all (prune's own per-table seconds, and the
subprocess's wall time), the writer's insert latency p50/p99/max per phase and p99 during prune
/ idle, InnoDB row-lock waits during prune, and EXPLAIN of every statement kind one batch sends on
the full tables (an in-process prune of one batch per table before the timed run).

Targets: >= 5,000 rows/s (a shop cancelling 100,000 orders a day finishes about 700,000 rows a
day, in under 3 minutes); writer p99 during prune <= 2 x idle; no statement reads a table whole.

    .venv/bin/python bench/prune.py [--quick] [--rows 1000000] [--batch-sizes 500,2000] [--gap-ms 2]
"""

from __future__ import annotations

import re
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event, text

from bench import OUT_DIR, database, reporting, seed
from bench.configs import ALLOW_SANDBOX_ENV
from cancel_scanner.engine.db import make_engine
from testsupport.processes import run_cli, write_config

TABLES = ("req_order_ops", "refund_order", "goods_order2_oplog")
AGE_DAYS = 100  # every seeded row is this old; prune moves rows older than 90 days
RATE_TARGET = 5_000.0  # rows/s
P99_RATIO_TARGET = 2.0
FULL_SCANS = ("ALL", "index")
_LINE = re.compile(r"(\w+)\s+moved\s+([\d,]+) rows in ([\d,]+) batches, ([\d.]+) s")


def seed_finished_old(conn, rows: int) -> None:
    """``rows`` finished orders' request, refund and one oplog event, created and changed AGE_DAYS ago."""
    seed.requests(conn, 1, rows, "finished")
    seed.refunds(conn, 1, rows, "finished")
    seed.oplog(conn, 1, rows, ("REFUND_SUCCEEDED",))
    for table in TABLES:
        top = database.scalar(conn, f"SELECT MAX(id) FROM {table}")  # the oplog's auto-increment ids have gaps
        for lo in range(1, top + 1, seed.SEED_CHUNK_ROWS):
            hi = min(top, lo + seed.SEED_CHUNK_ROWS - 1)
            database.sql(
                conn,
                f"UPDATE {table} SET created_at = NOW(3) - INTERVAL {AGE_DAYS} DAY,"
                f" updated_at = NOW(3) - INTERVAL {AGE_DAYS} DAY WHERE id BETWEEN {lo} AND {hi}",
            )
    seed.analyze(conn)


class Writer(threading.Thread):
    """An order, then a merchant's request, one every ``gap`` seconds (autocommit); each latency by phase and kind."""

    ORDER = text(
        "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount)"
        " VALUES (:id, :no, 1, 7, 1, 1, 100)"
    )
    REQUEST = text(
        "INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES (:id, 'MERCHANT_CANCEL', 'bench', 'load')"
    )

    def __init__(self, url: str, first_id: int, gap: float) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        self.next_id, self.gap = first_id, gap
        self.phase = "idle"
        self.latencies: dict[tuple[str, str], list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            due = time.monotonic()
            order = True
            while not self.stop.is_set():
                kind, statement = ("order", self.ORDER) if order else ("request", self.REQUEST)
                started = time.monotonic()
                conn.execute(statement, {"id": self.next_id, "no": f"SHOP{self.next_id}"})
                conn.commit()
                self.latencies.setdefault((self.phase, kind), []).append(time.monotonic() - started)
                if not order:
                    self.next_id += 1
                order = not order
                due += self.gap
                self.stop.wait(max(0.0, due - time.monotonic()))
        self.engine.dispose()

    def all(self, phase: str) -> list[float]:
        return [x for (p, _k), values in self.latencies.items() if p == phase for x in values]


def explain_one_batch(engine, conn, batch: int) -> list[list]:
    """One batch per table in this process, each statement kind EXPLAINed on the full tables before it runs."""
    from cancel_scanner.operations.prune import prune

    seen: dict[tuple[str, str], list] = {}

    def capture(_c, _cursor, statement, parameters, _context, _many):
        verb = statement.split()[0].upper()
        if verb not in ("SELECT", "INSERT", "DELETE") or "UTC_TIMESTAMP" in statement:
            return
        table = re.search(r"\bFROM (\w+)", statement).group(1)
        what = {"INSERT": "copy", "DELETE": "delete"}.get(verb) or (
            "open orders" if "DISTINCT" in statement else "lock" if "FOR UPDATE" in statement else "scan"
        )
        key = (what, table)
        if key in seen:
            return
        with conn.cursor() as cur:
            cur.execute("EXPLAIN " + statement, parameters)
            names = [d[0] for d in cur.description]
            seen[key] = [dict(zip(names, r)) for r in cur.fetchall()]

    event.listen(engine, "before_cursor_execute", capture)
    try:
        prune(engine, older_than=timedelta(days=90), batch_size=batch, max_rows=batch)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    out = []
    order = ("scan", "open orders", "lock", "copy", "delete")
    for (what, table), plan in sorted(
        seen.items(), key=lambda kv: (TABLES.index(kv[0][1]) if kv[0][1] in TABLES else 9, order.index(kv[0][0]))
    ):
        for row in plan:
            out.append(
                [what, table, row["table"], row["type"], row["key"], row["rows"], row["Extra"] or "", _verdict(row)]
            )
    return out


def _verdict(row: dict) -> str:
    """ "FULL SCAN" for a table read whole; an IN list of 1,000 ids or more is a temporary table of its own
    (MariaDB's in_predicate_conversion_threshold), read whole by design, then each id by primary key."""
    name = str(row["table"] or "")
    if not name or name.startswith("<"):
        return "the id list"
    return "FULL SCAN" if row["type"] in FULL_SCANS else "index"


def lock_counters(conn) -> dict[str, int]:
    return {name: database.status_counter(conn, name) for name in ("Innodb_row_lock_waits", "Innodb_row_lock_time")}


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="finished orders (default 1,000,000; --quick 100,000)")
    p.add_argument("--batch-sizes", default="500,2000", help="comma-separated (default 500,2000)")
    p.add_argument("--gap-ms", type=float, default=2.0, help="the writer's pause between inserts")
    p.add_argument("--idle-seconds", type=float, default=None, help="the writer alone first (default 10; --quick 5)")
    p.add_argument("--after-seconds", type=float, default=3.0, help="the writer after prune ended")
    args = reporting.arguments(p)  # parsed, the product's logging quieted
    rows = reporting.size(args, "rows", quick=100_000, full=1_000_000)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    idle_seconds = reporting.size(args, "idle_seconds", quick=5.0, full=10.0)
    report = reporting.Report(
        f"prune: {rows:,} finished orders ({rows:,} rows in each of {', '.join(TABLES)}) while the shop writes"
    )
    report.note(
        "Each measurement on a fresh database of the same server (testsupport/mariadb.py's settings:"
        " innodb_flush_log_at_trx_commit=2, 256 MB buffer pool); purge waited for after seeding. The first"
        " batch of each table is moved in-process (for EXPLAIN) before the timed run, which moves the rest."
    )

    speed_rows, latency_rows, explain_rows, lock_rows = [], [], [], []
    rates, ratios, all_indexed, worst_max = {}, {}, True, 0.0
    with database.Bench(report=report) as bench:
        for batch in sizes:
            name = f"bench_prune_{batch}"
            db = bench.seeded(
                name, lambda conn: seed_finished_old(conn, rows), f"{rows:,} finished orders", f"batch {batch}"
            )
            url, engine, conn = db.url, db.engine, db.conn
            database.wait_for_purge(conn)

            for row in explain_one_batch(engine, conn, batch):
                all_indexed &= row[-1] != "FULL SCAN"
                explain_rows.append([f"{batch:,}", *row])
            first_moved = batch  # per table, by explain_one_batch

            writer = Writer(url, rows + 1, args.gap_ms / 1000)
            writer.start()
            time.sleep(idle_seconds)  # the writer alone: the baseline (a benchmark, not a test)
            config = write_config(OUT_DIR / f"prune-{batch}.yaml", {"database_url": url})
            locks_before = lock_counters(conn)
            writer.phase = "prune"
            t0 = time.monotonic()
            done = run_cli(
                ["prune", "--older-than", "90d", "--batch-size", str(batch), "--max-rows", str(rows)],
                config=config,
                env=ALLOW_SANDBOX_ENV,
                cwd=OUT_DIR,
                timeout=7_200,
            )
            wall = time.monotonic() - t0
            writer.phase = "after"
            locks_after = lock_counters(conn)
            time.sleep(args.after_seconds)
            writer.stop.set()
            writer.join(10)
            if done.returncode != 0:
                raise RuntimeError(f"prune exited {done.returncode}: {done.stderr[-2000:]}")
            (OUT_DIR / f"prune-{batch}.out").write_text(done.stdout + done.stderr, encoding="utf-8")

            moved_total, seconds_total = 0, 0.0
            for line in done.stdout.splitlines():
                match = _LINE.match(line)
                if not match:
                    continue
                table, moved, batches, seconds = (
                    match.group(1),
                    int(match.group(2).replace(",", "")),
                    int(match.group(3).replace(",", "")),
                    float(match.group(4)),
                )
                archived = database.scalar(conn, f"SELECT COUNT(*) FROM {table}_archive")
                if moved + first_moved != rows or archived != rows:
                    raise RuntimeError(f"{table}: moved {moved} + {first_moved}, archived {archived}, expected {rows}")
                moved_total += moved
                seconds_total += seconds
                speed_rows.append([f"{batch:,}", table, moved, batches, seconds, moved / seconds if seconds else None])
            rates[batch] = moved_total / wall
            speed_rows.append(
                [f"{batch:,}", "all three (subprocess wall time)", moved_total, "", round(wall, 1), rates[batch]]
            )
            lock_rows.append(
                [
                    f"{batch:,}",
                    locks_after["Innodb_row_lock_waits"] - locks_before["Innodb_row_lock_waits"],
                    locks_after["Innodb_row_lock_time"] - locks_before["Innodb_row_lock_time"],
                ]
            )

            idle99 = reporting.percentile(writer.all("idle"), 99)
            during = writer.all("prune")
            ratios[batch] = reporting.ratio(reporting.percentile(during, 99), idle99)
            worst_max = max(worst_max, max(during))
            for phase in ("idle", "prune", "after"):
                for kind in ("order", "request", "both"):
                    lat = writer.all(phase) if kind == "both" else writer.latencies.get((phase, kind), [])
                    if not lat:
                        continue
                    latency_rows.append(
                        [
                            f"{batch:,}",
                            phase,
                            kind,
                            len(lat),
                            reporting.percentile(lat, 50) * 1000,
                            reporting.percentile(lat, 99) * 1000,
                            max(lat) * 1000,
                        ]
                    )
            conn.close()
            bench.drop(name)
            print(f"[batch {batch}] {rates[batch]:,.0f} rows/s; writer p99 prune/idle {ratios[batch]:.2f}", flush=True)

    report.table(
        "prune's speed (its own per-table seconds; the last line per batch size: the command's wall time)",
        ["batch size", "table", "rows moved", "batches", "seconds", "rows/s"],
        speed_rows,
    )
    report.table(
        "writer: one INSERT per gap, autocommit (ms)",
        ["batch size", "phase", "insert", "inserts", "p50", "p99", "max"],
        latency_rows,
    )
    report.table(
        "InnoDB row-lock waits while prune ran (Innodb_row_lock_waits, Innodb_row_lock_time ms; the whole server)",
        ["batch size", "waits", "ms waited"],
        lock_rows,
    )
    report.table(
        "EXPLAIN of each statement kind of one batch, on the full tables (FORCE INDEX names each index)",
        ["batch size", "statement", "of", "table", "type", "key", "rows (estimate)", "Extra", "verdict"],
        explain_rows,
    )

    slowest = min(rates, key=rates.get)
    report.target(
        "prune speed",
        ", ".join(f"{rates[b]:,.0f} rows/s at batch {b:,}" for b in sizes),
        f">= {RATE_TARGET:,.0f} rows/s",
        rates[slowest] >= RATE_TARGET,
    )
    report.target(
        "shop writer during prune",
        ", ".join(f"p99 {ratios[b]:.2f} x idle at batch {b:,}" for b in sizes)
        + f"; longest insert {worst_max * 1000:.0f} ms",
        f"p99 <= {P99_RATIO_TARGET:.0f} x idle",
        max(ratios.values()) <= P99_RATIO_TARGET,
    )
    report.target(
        "no statement reads a table whole",
        "all use an index" if all_indexed else "a full scan (see EXPLAIN)",
        "index for every statement",
        all_indexed,
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
