"""Memory under batches of varying size: what a long-running daemon sees, unlike a full-batch drain.

A drain of 100,000 ready rows runs full batches only (bench/stages.py). A daemon in
production mostly runs partial ones: 37 rows now, 212 later. Anything the engine keeps
per distinct statement shape (SQLAlchemy's compiled cache holds up to 500 statements
per engine) then grows with the number of distinct batch sizes. Here a Runner in this
process (what the daemon's tick runs) drives each database stage through ``--batches``
batches of random size 1..500 and we read this process's RSS and the engine's compiled
cache as it goes.

Target: RSS <= 200 MB (the issue's bound for the daemon).

The four stages run one after another in this one process, as the daemon runs all its
stages in one process; each has its own database and engine here (the daemon has one
engine, so one LRU of 500 for all its statements).

    PYTHONPATH=. python bench/memory.py [--quick] [--batches 120]
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import configs, database, reporting, seed
from testsupport.processes import process_memory_mb

RSS_TARGET_MB = 200.0
MAX_BATCH = 500


def rss_mb() -> float:
    return process_memory_mb(os.getpid())["VmRSS"]


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=None, help="batches per stage (default 120; --quick 40)")
    seed.stages_option(p)
    p.add_argument("--seed", type=int, default=1)
    args = reporting.arguments(p)
    batches = reporting.size(args, "batches", quick=40, full=120)
    report = reporting.Report(
        f"Memory: {batches} batches of random size 1..{MAX_BATCH} per database stage, one process"
    )

    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    rows, peak = [], 0.0
    with database.Bench(report=report) as bench:
        for stage in [s for s in args.stages.split(",") if s]:
            rng = random.Random(args.seed)
            sizes = [rng.randint(1, MAX_BATCH) for _ in range(batches)]
            name = f"bench_mem_{stage}"
            url, engine = bench.database(name)
            conn = bench.connect(name)
            seed.ready_for(conn, stage, sum(sizes))
            conn.close()
            config = configs.sandbox(url, configs.jobs(enabled=[stage]))
            runner = Runner(engine, config, build_stages(config), None)
            runner.run_stage(stage)  # warm: connections, first compilations
            start = rss_mb()
            checkpoints = {}
            for k, size in enumerate(sizes, 1):
                job = config.jobs[stage].model_copy(update={"batch_size": size})
                runner.config = replace(config, jobs={**config.jobs, stage: job})
                runner.run_stage(stage)
                if k in (batches // 4, batches // 2, batches):
                    checkpoints[k] = rss_mb()
            runner.close()
            cache = len(engine._compiled_cache) if engine._compiled_cache is not None else 0
            end = checkpoints[batches]
            peak = max(peak, process_memory_mb(os.getpid())["VmHWM"])
            rows.append([stage, start, *checkpoints.values(), end - start, cache, len(set(sizes))])
            engine.dispose()
            bench.drop(name)
            print(f"[{stage}] RSS {start:.0f} -> {end:.0f} MB, compiled cache {cache} statements", flush=True)
    quarters = [batches // 4, batches // 2, batches]
    report.table(
        f"RSS of one process (MB) as a Runner runs {batches} batches of random size per stage; stages one after another",
        [
            "stage",
            "after warm-up",
            *[f"after {q}" for q in quarters],
            "growth",
            "compiled cache entries",
            "distinct sizes",
        ],
        rows,
    )
    report.target(
        "RSS with varied batch sizes",
        f"{max(r[-4] for r in rows):.0f} MB at the end, peak {peak:.0f} MB",
        f"<= {RSS_TARGET_MB:.0f} MB",
        peak <= RSS_TARGET_MB,
    )
    report.note(
        "the engine's compiled cache is SQLAlchemy's LRU of 500 statements per engine; a statement whose shape depends "
        "on the batch (CASE id WHEN ... with one bound parameter per row) takes one entry per distinct size."
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
