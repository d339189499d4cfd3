"""Idle cost and table growth: nothing to do, 1,000,000 finished rows in every table.

Two databases on one server: "big" with 1,000,000 finished rows in each of goods,
goods_order2 (cancelled, refunded, stock and sales done), req_order_ops (accepted),
refund_order (every flag 1/1) and goods_order2_oplog, and "small" with 10,000.

1. EXPLAIN (and MariaDB's ANALYZE, which runs it and counts the rows it read) of every
   stage's polling query exactly as the runner sends it (``Stage.ready(now, batch_size)``
   ``FOR UPDATE SKIP LOCKED``), on both: verdict "index" unless some table is read by a
   full scan (type ALL) or a full index scan (type index).
2. One empty poll: ``Runner.run_stage(stage)`` finding nothing (BEGIN, the claim, COMMIT),
   timed per stage, alternating small and big, ``--reps`` times each; medians compared.
3. Queries per minute: the daemon (``cancel-scanner run``, jobs.yaml as shipped: six stages
   every 2 s) idles on "big"; the server's Questions and Com_* counters over ``--seconds``.

Targets: no polling query scans a whole table; empty poll at 1,000,000 <= 2 x at 10,000.

    PYTHONPATH=. python bench/idle.py [--quick] [--rows 1000000] [--small-rows 10000]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import OUT_DIR, configs, database, reporting, seed
from bench.emulator_server import EmulatorProcess
from testsupport.processes import DaemonProcess

POLL_RATIO_TARGET = 2.0
FULL_SCANS = ("ALL", "index")
COUNTERS = (
    "Questions",
    "Com_select",
    "Com_commit",
    "Com_rollback",
    "Com_begin",
    "Com_update",
    "Com_insert",
    "Com_set_option",
)


def seed_finished(conn, rows: int) -> None:
    seed.goods(conn, rows)
    seed.orders(conn, 1, rows, "finished", n_goods=rows)
    seed.requests(conn, 1, rows, "finished")
    seed.refunds(conn, 1, rows, "finished")
    seed.oplog(conn, 1, rows, ("CANCELLED",))
    seed.analyze(conn)


def polling_queries(config, engine):
    """(stage, SQL, params): each stage's ready query as the runner sends it to MariaDB."""
    from cancel_scanner.engine.runner import utcnow
    from cancel_scanner.scanners import build_stages

    now = utcnow()
    for name, stage in build_stages(config).items():
        query = stage.ready(now, config.job(name).batch_size).with_for_update(skip_locked=True)
        compiled = query.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
        yield name, str(compiled), compiled.params


def time_empty_polls(runners: dict, stages: list[str], reps: int, warmup: int = 20) -> dict:
    """Seconds per empty run_stage, by (database, stage); databases and stages interleaved."""
    times = {(db, s): [] for db in runners for s in stages}
    for rep in range(warmup + reps):
        for db, runner in runners.items():
            for stage in stages:
                started = time.perf_counter()
                report = runner.run_stage(stage)
                took = time.perf_counter() - started
                if report.claimed or report.error:
                    raise RuntimeError(f"{db}/{stage}: the poll was not empty: {report}")
                if rep >= warmup:
                    times[(db, stage)].append(took)
    return times


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--rows", type=int, default=None, help="finished rows per table, big (default 1,000,000; --quick 50,000)"
    )
    p.add_argument("--small-rows", type=int, default=10_000, help="finished rows per table, small (default 10,000)")
    p.add_argument(
        "--reps", type=int, default=None, help="empty polls per stage and database (default 300; --quick 50)"
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="idle daemon observed this long (default 60; --quick 20)"
    )
    args = reporting.arguments(p)
    big_rows = reporting.size(args, "rows", quick=50_000, full=1_000_000)
    small_rows = args.small_rows
    reps = reporting.size(args, "reps", quick=50, full=300)
    seconds = reporting.size(args, "seconds", quick=20.0, full=60.0)
    report = reporting.Report(f"Idle cost and table growth: {big_rows:,} vs {small_rows:,} finished rows per table")
    report.note(
        "Questions counts every statement a client sent (SELECT, COMMIT, ROLLBACK, SET ...); pool pre-pings are "
        "COM_PING and not counted. The idle daemon's statements per minute are (stages x 60 / interval) x "
        "statements per empty poll."
    )

    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    with database.Bench(report=report) as bench:
        both = bench.small_and_big(
            "bench_idle", (small_rows, big_rows), seed_finished, lambda rows: f"{rows:,} finished rows per table"
        )
        dbs = {label: (db.url, db.engine, db.conn) for label, db in both.items()}

        # 1. EXPLAIN / ANALYZE of every polling query
        plans = []
        all_indexed = True
        for label, (url, engine, conn) in dbs.items():
            config = configs.sandbox(url)
            for stage, statement, params in polling_queries(config, engine):
                plan, analyzed = database.explain(conn, statement, params)
                scans = [r for r in plan if r["type"] in FULL_SCANS]
                all_indexed &= not scans
                plans.append(
                    [
                        label,
                        stage,
                        " ".join(str(r["table"]) for r in plan),
                        *database.plan_cells(plan, analyzed),
                        "FULL SCAN" if scans else "index",
                    ]
                )
        report.table(
            "EXPLAIN of every polling query (the runner's claim, FOR UPDATE SKIP LOCKED)",
            ["rows/table", "stage", "table", *database.PLAN_COLUMNS, "verdict"],
            [[f"{big_rows if r[0] == 'big' else small_rows:,}", *r[1:]] for r in plans],
        )

        # 2. one empty poll, small vs big
        stage_names = list(build_stages(configs.sandbox(dbs["small"][0])))
        runners = {}
        for label, (url, engine, _conn) in dbs.items():
            config = configs.sandbox(url)
            runners[label] = Runner(engine, config, build_stages(config), None)
        print(f"timing {reps} empty polls per stage and database", flush=True)
        times = time_empty_polls(runners, stage_names, reps)
        for runner in runners.values():
            runner.close()
        poll_rows = []
        for stage in stage_names:
            small, big = reporting.median(times[("small", stage)]), reporting.median(times[("big", stage)])
            poll_rows.append([stage, small * 1000, big * 1000, big / small])
        tick_small = sum(r[1] for r in poll_rows)
        tick_big = sum(r[2] for r in poll_rows)
        poll_rows.append(["all stages (one round)", tick_small, tick_big, tick_big / tick_small])
        report.table(
            f"One empty poll (Runner.run_stage finding nothing), median of {reps}",
            ["stage", f"ms at {small_rows:,}", f"ms at {big_rows:,}", "ratio"],
            poll_rows,
        )

        # 3. queries per minute of the idle daemon on the big database
        big_url, _engine, big_conn = dbs["big"]
        with EmulatorProcess(log_name="idle-emulator") as emulator:
            raw = {"database_url": big_url, "wechat": emulator.wechat(), "jobs": configs.jobs()}
            with DaemonProcess(OUT_DIR, raw, emulator.env(), name="idle") as daemon:
                time.sleep(6)  # past start-up: every stage has polled a few times
                spent = database.spent_while(big_conn, COUNTERS, daemon, bench.server, seconds)
                rss = daemon.memory_mb()
        delta = spent.per_minute
        report.table(
            f"Idle daemon on {big_rows:,} finished rows per table, observed {spent.seconds:.0f} s (per minute)",
            ["figure", "per minute"],
            [
                ["statements (Questions)", delta["Questions"]],
                *[[k, delta[k]] for k in COUNTERS[1:]],
                ["daemon CPU seconds", spent.daemon_cpu],
                ["mariadbd CPU seconds", spent.server_cpu],
                ["daemon RSS MB (now / peak)", f"{rss['VmRSS']:.0f} / {rss['VmHWM']:.0f}"],
            ],
        )
        for _url, _engine, conn in dbs.values():
            conn.close()

    report.target(
        "no polling query scans a whole table",
        "all use an index" if all_indexed else "a full scan (see table)",
        "index for every polling query",
        all_indexed,
    )
    worst = max(poll_rows[:-1], key=lambda r: r[3])
    report.target(
        f"empty poll at {big_rows:,} vs {small_rows:,}",
        f"{tick_big / tick_small:.2f} x for a round of six; worst stage {worst[0]} {worst[3]:.2f} x",
        f"<= {POLL_RATIO_TARGET:.0f} x",
        max(r[3] for r in poll_rows) <= POLL_RATIO_TARGET,
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
