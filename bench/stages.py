"""Database stages: rows/s of each stage draining N rows, against a ceiling and a baseline.

For each of intake, sync_result, restore_stock and decrement_sales, in a fresh database:

1. seed N rows ready for that stage (in the state the previous stage leaves them);
2. ceiling: on a copy of the stage's table (same size, same indexes), flip the stage's
   flags in batches of the stage's batch size, one UPDATE per batch on one connection
   (``UPDATE t SET x_scanned=1, x_success=1 WHERE id BETWEEN a AND b AND x_scanned=0``);
3. baseline: on another copy, a naive scanner: select a batch of ready ids, then one
   transaction per row (UPDATE one row, COMMIT), over ``--baseline-rows`` rows;
4. the stage: the real daemon (``cancel-scanner run``, only that stage enabled, jobs.yaml's
   interval and batch size) drains the N rows. Its rate comes from the database's own
   timestamps: (N - one batch) / (last flip - first flip), so start-up is not counted.

Also records the daemon's peak RSS (VmHWM) and CPU time while it drains. ``--profile``
drains once more in this process under pyinstrument and writes bench/out/profile-<stage>.txt.

Targets: rows/s >= 0.25 x ceiling and >= 10 x baseline; peak RSS <= 200 MB.

    PYTHONPATH=. python bench/stages.py [--quick] [--n 100000] [--stages intake,sync_result] [--profile]
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import OUT_DIR, configs, database, profiling, reporting, seed
from bench.emulator_server import EmulatorProcess
from testsupport.processes import DaemonProcess
from testsupport.waiting import timed_wait

CEILING_RATIO_TARGET = 0.25
BASELINE_RATIO_TARGET = 10.0
PEAK_RSS_TARGET_MB = 200.0
DRAIN_STALL_SECONDS = 180.0  # no progress this long: the run is broken, not slow


@dataclass(frozen=True)
class Spec:
    table: str
    scanned: str
    success: str
    ready_where: str  # what a naive scanner would select (index-served), without the ORDER BY


SPECS = {
    "intake": Spec("req_order_ops", "scanned", "success", "scanned = 0 AND success = 0"),
    "sync_result": Spec(
        "refund_order", "sync_scanned", "sync_success", "progress_scanned = 1 AND sync_scanned = 0 AND sync_success = 0"
    ),
    "restore_stock": Spec(
        "goods_order2",
        "stock_scanned",
        "stock_success",
        "stock_scanned = 0 AND stock_success = 0 AND order_status = 'CANCELLED' AND refund_status = 'REFUNDED' AND is_deleted = 0",
    ),
    "decrement_sales": Spec(
        "goods_order2",
        "sales_scanned",
        "sales_success",
        "sales_scanned = 0 AND sales_success = 0 AND order_status = 'CANCELLED' AND refund_status = 'REFUNDED' AND is_deleted = 0",
    ),
}


def copy_table(conn, table: str, copy: str) -> None:
    database.sql(conn, f"DROP TABLE IF EXISTS {copy}")
    database.sql(conn, f"CREATE TABLE {copy} LIKE {table}")
    database.sql(conn, f"INSERT INTO {copy} SELECT * FROM {table}")
    database.sql(conn, f"ANALYZE TABLE {copy}")


def ceiling(conn, spec: Spec, n: int, batch: int) -> float:
    """Rows/s flipping the flags, one UPDATE (autocommit) per batch."""
    copy_table(conn, spec.table, "bench_ceiling")
    database.wait_for_purge(conn)
    flipped = 0
    started = time.perf_counter()
    with conn.cursor() as cur:
        for lo in range(1, n + 1, batch):
            flipped += cur.execute(
                f"UPDATE bench_ceiling SET {spec.scanned} = 1, {spec.success} = 1 "
                f"WHERE id BETWEEN %s AND %s AND {spec.scanned} = 0",
                (lo, min(n, lo + batch - 1)),
            )
    elapsed = time.perf_counter() - started
    assert flipped == n, f"ceiling flipped {flipped} of {n}"
    database.sql(conn, "DROP TABLE bench_ceiling")
    return n / elapsed


def baseline(conn, spec: Spec, rows: int, batch: int) -> float:
    """Rows/s of a naive scanner: select ready ids, then one transaction per row."""
    copy_table(conn, spec.table, "bench_baseline")
    database.wait_for_purge(conn)
    flipped = 0
    database.sql(conn, "SET autocommit = 0")
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            while flipped < rows:
                cur.execute(f"SELECT id FROM bench_baseline WHERE {spec.ready_where} ORDER BY id LIMIT %s", (batch,))
                ids = [r[0] for r in cur.fetchall()]
                conn.commit()
                if not ids:
                    break
                for row_id in ids[: rows - flipped]:
                    cur.execute(
                        f"UPDATE bench_baseline SET {spec.scanned} = 1, {spec.success} = 1 "
                        f"WHERE id = %s AND {spec.scanned} = 0",
                        (row_id,),
                    )
                    conn.commit()
                    flipped += 1
        elapsed = time.perf_counter() - started
    finally:
        database.sql(conn, "SET autocommit = 1")
    database.sql(conn, "DROP TABLE bench_baseline")
    return flipped / elapsed


def drain_with_daemon(
    bench: database.Bench, emulator: EmulatorProcess, url: str, conn, stage: str, n: int, batch: int, daemons: int = 1
) -> dict:
    spec = SPECS[stage]
    raw = {"database_url": url, "wechat": emulator.wechat(), "jobs": configs.jobs(enabled=[stage])}
    pending_sql = f"SELECT EXISTS (SELECT 1 FROM {spec.table} WHERE {spec.ready_where})"
    done_sql = f"SELECT COUNT(*) FROM {spec.table} WHERE {spec.scanned} = 1"
    stall = database.Stall(stage, n, DRAIN_STALL_SECONDS, last=0)

    def drained() -> bool:
        if not database.scalar(conn, pending_sql):
            return True
        stall.check(database.scalar(conn, done_sql), daemon.log_path)
        return False

    with ExitStack() as stack:
        names = [f"stages-{stage}-{k}" if daemons > 1 else f"stages-{stage}" for k in range(daemons)]
        fleet = [stack.enter_context(DaemonProcess(OUT_DIR, raw, emulator.env(), name=name)) for name in names]
        daemon = fleet[0]
        cpu0 = sum(d.cpu_seconds() for d in fleet)
        wall = timed_wait(drained, timeout=3600, interval=0.2, what=f"{stage} to drain")
        cpu = sum(d.cpu_seconds() for d in fleet) - cpu0
        memory = {"VmHWM": max(d.memory_mb()["VmHWM"] for d in fleet)}
    count, ok, first, last_flip = database.sql(
        conn,
        f"SELECT COUNT(*), SUM({spec.success}), MIN(updated_at), MAX(updated_at) FROM {spec.table} WHERE {spec.scanned} = 1",
    )[0]
    span = (last_flip - first).total_seconds()
    return {
        "rows": int(count),
        "ok": int(ok or 0),
        "rate": (count - batch) / span if span > 0 else None,
        "span": span,
        "wall": wall,
        "cpu": cpu,
        "peak_rss": memory["VmHWM"],
    }


def profile_in_process(url: str, stage: str, n: int) -> tuple[float, Path | None]:
    """Drain again in this process (a Runner, as the daemon's tick does), under pyinstrument if installed."""
    from cancel_scanner.engine.db import make_engine
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    config = configs.sandbox(url, configs.jobs(enabled=[stage]))
    engine = make_engine(url)
    runner = Runner(engine, config, build_stages(config), None)
    try:
        return profiling.profiled_drain(runner, stage, counted="claimed")
    finally:
        runner.close()
        engine.dispose()


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="rows per stage (default 100,000; --quick 5,000)")
    p.add_argument("--baseline-rows", type=int, default=None, help="rows the naive scanner flips (default 20,000)")
    seed.stages_option(p)
    p.add_argument(
        "--profile", action="store_true", help="also drain in-process under pyinstrument (bench/out/profile-*)"
    )
    p.add_argument("--daemons", type=int, default=1, help="daemons draining together (several may share a database)")
    p.add_argument(
        "--durable",
        action="store_true",
        help="fsync the redo log at every commit (innodb_flush_log_at_trx_commit=1) instead of the test bed's =2",
    )
    args = reporting.arguments(p)
    n = reporting.size(args, "n", quick=5_000, full=100_000)
    baseline_rows = min(n, reporting.size(args, "baseline_rows", quick=2_000, full=20_000))
    stages = seed.chosen_stages(p, args)
    durability = (
        "durable: innodb_flush_log_at_trx_commit=1"
        if args.durable
        else "test bed settings: innodb_flush_log_at_trx_commit=2"
    )
    fleet = f", {args.daemons} daemons at once" if args.daemons > 1 else ""
    report = reporting.Report(f"Database stages: {n:,} rows each ({durability}{fleet})")
    report.note(
        "ceiling: one UPDATE of the two flag columns per batch of `batch` ids, autocommit, on a copy of the table; "
        "baseline: SELECT a batch of ready ids, then UPDATE + COMMIT per row, on another copy; "
        "daemon: `cancel-scanner run` with only that stage enabled (jobs.yaml defaults), rate = (rows - one batch) / "
        "(last updated_at - first updated_at) of the flipped rows."
    )

    rows = []
    peak = 0.0
    with (
        database.Bench(durable=args.durable, report=report) as bench,
        EmulatorProcess(log_name="stages-emulator") as emulator,
    ):
        for stage in stages:
            spec = SPECS[stage]
            batch = configs.jobs()[stage]["batch_size"]
            name = f"bench_{stage}"
            url, _engine = bench.database(name)
            conn = bench.connect(name)
            print(f"\n[{stage}] seeding {n:,} rows", flush=True)
            t = time.perf_counter()
            seed.ready_for(conn, stage, n)
            print(f"[{stage}] seeded in {time.perf_counter() - t:.1f} s; ceiling", flush=True)
            ceil_rate = ceiling(conn, spec, n, batch)
            print(f"[{stage}] ceiling {ceil_rate:,.0f} rows/s; baseline over {baseline_rows:,} rows", flush=True)
            base_rate = baseline(conn, spec, baseline_rows, batch)
            print(f"[{stage}] baseline {base_rate:,.0f} rows/s; draining with the daemon", flush=True)
            database.wait_for_purge(conn)
            d = drain_with_daemon(bench, emulator, url, conn, stage, n, batch, args.daemons)
            print(f"[{stage}] daemon {d['rate']:,.0f} rows/s", flush=True)
            if d["ok"] != n:
                report.note(f"{stage}: {d['ok']:,} of {n:,} rows ended done (1/1); see bench/out/stages-{stage}*.log")
            peak = max(peak, d["peak_rss"])
            prof_rate = None
            if args.profile:
                database.sql(conn, f"UPDATE {spec.table} SET {spec.scanned} = 0, {spec.success} = 0")
                if stage in ("restore_stock", "decrement_sales"):
                    event = "STOCK_RESTORED" if stage == "restore_stock" else "SALES_DECREMENTED"
                    database.sql(conn, "DELETE FROM goods_order2_oplog WHERE event = %s", (event,))
                elif stage == "sync_result":
                    database.sql(
                        conn,
                        "UPDATE goods_order2 SET refund_status = 'REFUNDING', wx_progress_scanned = 0, refunded_at = NULL",
                    )
                    database.sql(conn, "DELETE FROM goods_order2_oplog WHERE event = 'REFUND_SUCCEEDED'")
                else:
                    database.sql(
                        conn,
                        "UPDATE goods_order2 SET order_status = 'PAID', cancel_source = NULL, cancelled_at = NULL, refund_status = 'NONE'",
                    )
                    database.sql(conn, "DELETE FROM refund_order")
                    database.sql(conn, "DELETE FROM goods_order2_oplog")
                database.wait_for_purge(conn)
                prof_rate, out = profile_in_process(url, stage, n)
                print(f"[{stage}] in-process under the profiler: {prof_rate:,.0f} rows/s; {out}", flush=True)
            rows.append(
                [
                    stage,
                    spec.table,
                    batch,
                    ceil_rate,
                    base_rate,
                    d["rate"],
                    reporting.ratio(d["rate"], ceil_rate),
                    reporting.ratio(d["rate"], base_rate),
                    d["cpu"] * 1e6 / n,
                    d["peak_rss"],
                ]
                + ([prof_rate] if args.profile else [])
            )
            conn.close()
            bench.drop(name)

    headers = [
        "stage",
        "table",
        "batch",
        "ceiling rows/s",
        "baseline rows/s",
        "daemon rows/s",
        "x ceiling",
        "x baseline",
        "daemon CPU ms / 1k rows",
        "daemon peak RSS MB",
    ] + (["in-process rows/s (profiled)"] if args.profile else [])
    report.table(f"Database stages, N = {n:,} rows each (baseline over {baseline_rows:,} rows)", headers, rows)
    for row in rows:
        stage, rate, x_ceil, x_base = row[0], row[5], row[6], row[7]
        report.target(
            f"{stage} vs ceiling",
            f"{x_ceil:.2f} x ({rate:,.0f} rows/s)",
            f">= {CEILING_RATIO_TARGET} x",
            x_ceil >= CEILING_RATIO_TARGET,
        )
        report.target(
            f"{stage} vs baseline",
            f"{x_base:.1f} x",
            f">= {BASELINE_RATIO_TARGET:.0f} x",
            x_base >= BASELINE_RATIO_TARGET,
        )
    report.target(
        "daemon peak RSS draining",
        f"{peak:.0f} MB (max over the stages above)",
        f"<= {PEAK_RSS_TARGET_MB:.0f} MB",
        peak <= PEAK_RSS_TARGET_MB,
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
