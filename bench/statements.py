"""Where a database stage's batch goes: server time per statement, next to the batch's wall time.

For each database stage, seeds N rows ready for it (as bench/stages.py does), turns on
MariaDB's slow query log with ``long_query_time = 0`` (every statement, with its time
and rows examined), runs ``--batches`` batches with a Runner in this process and groups
the log by statement. "client" is the rest of the batch's wall time: Python (SQLAlchemy,
the stage, PyMySQL) and the round trips. This is the database half of the profile;
bench/stages.py --profile gives the Python half (pyinstrument).

    PYTHONPATH=. python bench/statements.py [--quick] [--n 100000] [--batches 20]
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import configs, database, reporting, seed

_ENTRY = re.compile(r"Query_time: ([\d.]+).*?Rows_examined: (\d+)", re.S)


def statement_key(lines: list[str]) -> str:
    text = " ".join(line for line in lines if line and not line.startswith(("#", "SET timestamp", "use ")))
    text = re.sub(r"\s+", " ", text).strip().rstrip(";")
    words = text.split(" ")
    verb = words[0].upper() if words else "?"
    table = "?"
    for marker in ("FROM", "INTO", "UPDATE"):
        if marker in (w.upper() for w in words):
            idx = [w.upper() for w in words].index(marker)
            if idx + 1 < len(words):
                table = words[idx + 1].strip("`(,")
                break
    if verb == "UPDATE":
        sets = re.search(r" SET (.+?)(?: WHERE |$)", text)
        first = sets.group(1).split("=")[0].strip() if sets else ""
        return f"UPDATE {table} SET {first}=..."
    if verb == "SELECT":
        return f"SELECT ... FROM {table}" + (" FOR UPDATE" if "FOR UPDATE" in text.upper() else "")
    if verb == "INSERT":
        return f"INSERT INTO {table}"
    return verb


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="rows seeded per stage (default 100,000; --quick 5,000)")
    p.add_argument("--batches", type=int, default=None, help="batches observed (default 20; --quick 5)")
    seed.stages_option(p)
    args = reporting.arguments(p)
    n = reporting.size(args, "n", quick=5_000, full=100_000)
    batches = reporting.size(args, "batches", quick=5, full=20)
    report = reporting.Report(
        f"Server time per statement in one batch: {batches} batches of each database stage, {n:,} rows seeded"
    )

    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    with database.Bench(report=report) as bench:
        for stage in [s for s in args.stages.split(",") if s]:
            name = f"bench_stmt_{stage}"
            url, engine = bench.database(name)
            conn = bench.connect(name)
            seed.ready_for(conn, stage, n)
            database.wait_for_purge(conn)
            log = bench.server.folder / f"statements-{stage}.log"
            database.sql(conn, "SET GLOBAL slow_query_log = 0")
            database.sql(conn, f"SET GLOBAL slow_query_log_file = '{log}'")
            database.sql(conn, "SET GLOBAL long_query_time = 0")
            database.sql(conn, "SET GLOBAL slow_query_log = 1")
            engine.dispose()  # both settings are copied into a session when it connects
            config = configs.sandbox(url, configs.jobs(enabled=[stage]))
            runner = Runner(engine, config, build_stages(config), None)
            runner.run_stage(stage)  # connect and warm up: logged, skipped below
            offset = log.stat().st_size
            started = time.perf_counter()
            for _ in range(batches):
                runner.run_stage(stage)
            wall = (time.perf_counter() - started) / batches
            database.sql(conn, "SET GLOBAL slow_query_log = 0")
            database.sql(conn, "SET GLOBAL long_query_time = 10")
            runner.close()
            engine.dispose()
            agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
            for entry in text.split("# User@Host")[1:]:
                m = _ENTRY.search(entry)
                if not m or "SET GLOBAL" in entry or "slow_query_log" in entry:
                    continue
                a = agg[statement_key(entry.splitlines()[1:])]
                a[0] += 1
                a[1] += float(m.group(1))
                a[2] += int(m.group(2))
            server = sum(a[1] for a in agg.values()) / batches
            rows = [
                [stage, key, count / batches, seconds / batches * 1000, examined / batches]
                for key, (count, seconds, examined) in sorted(agg.items(), key=lambda kv: -kv[1][1])
                if seconds / batches >= 0.0001
            ]
            rows.append(
                [stage, "all statements (server)", sum(a[0] for a in agg.values()) / batches, server * 1000, None]
            )
            rows.append([stage, "client: Python, driver, round trips", None, (wall - server) * 1000, None])
            rows.append([stage, "**batch wall time**", None, wall * 1000, None])
            report.table(
                f"{stage}: one batch of {configs.jobs()[stage]['batch_size']} rows, mean of {batches}",
                ["stage", "statement", "count / batch", "ms / batch", "rows examined / batch"],
                rows,
            )
            conn.close()
            bench.drop(name)
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
