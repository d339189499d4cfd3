"""Gateway stages: submit_refund and poll_refund against the emulator at WeChat's limits.

The emulator runs in its own process with WeChat's limits (150 applies/s, 300 queries/s,
a sliding one-second window; over it answers 429 FREQUENCY_LIMITED) and a per-call
latency of 20 ms (a "slow" fault that strikes before the refund is recorded with
probability 1: the call waits, then is processed and answered 200 as usual). The
daemon (``cancel-scanner run``, only the stage under test enabled, jobs.yaml's batch size
200 and concurrency 16, client pace apply_qps 150 / query_qps 300) drains N refunds:

1. submit_refund: N refunds as intake leaves them (``submit_scanned=0``, due);
2. poll_refund: the same N refunds, now accepted, with their first poll made due.

calls/s is measured at the emulator: accepted calls (HTTP 200) over the span from the
first to the last. The 429 count is the emulator's. Latency x concurrency bounds the rate
at concurrency / latency = 16 / 20 ms = 800 calls/s, above both limits, so the target
(>= 0.9 x the limit, no 429) applies.

With ``--daemons K``, K daemons of the one merchant drain together: they share its limits
(wechat.qps_shared), so the target is the same, for their sum.

    PYTHONPATH=. python bench/gateway_stages.py [--quick] [--n 20000] [--daemons 3]
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import OUT_DIR, configs, database, profiling, reporting, seed
from bench.emulator_server import GATEWAY_LATENCY_SECONDS, WECHAT_APPLY_QPS, WECHAT_QUERY_QPS, EmulatorProcess
from testsupport.processes import DaemonProcess
from testsupport.waiting import timed_wait

LIMIT_RATIO_TARGET = 0.9
PEAK_RSS_TARGET_MB = 200.0
DRAIN_STALL_SECONDS = 120.0


def latency_check(emulator: EmulatorProcess, calls: int = 20) -> float:
    """Median seconds of one query, sequential, through the real client: proves the latency is there."""
    from cancel_scanner.gateway.wechat import WeChatPayGateway

    i = emulator.info
    gateway = WeChatPayGateway(
        mchid=i["mchid"],
        appid=i["appid"],
        merchant_serial_no=i["merchant_serial_no"],
        merchant_private_key_pem=Path(i["merchant_private_key_file"]).read_text(),
        platform_public_key_pem=Path(i["platform_public_key_file"]).read_text(),
        platform_public_key_id=i["platform_public_key_id"],
        apiv3_key=emulator.env()["WECHATPAY_APIV3_KEY"],
        base_url=i["base_url"],
        apply_qps=None,
        query_qps=None,
    )
    took = []
    try:
        for k in range(calls):
            started = time.perf_counter()
            result = gateway.query(f"LATENCYCHECK{k}")  # unknown: 404 RESOURCE_NOT_EXISTS, after the latency
            took.append(time.perf_counter() - started)
            assert type(result).__name__ == "RetryLater", result
    finally:
        gateway.close()
    emulator.reset()
    return reporting.median(took)


def drain(
    emulator: EmulatorProcess, url: str, conn, stage: str, pending_where: str, n: int, knobs: dict, daemons: int = 1
) -> dict:
    raw = {
        "database_url": url,
        "wechat": emulator.wechat(knobs["apply_qps"], knobs["query_qps"]),
        "jobs": configs.jobs(enabled=[stage], **{stage: knobs["job"]}),
    }
    done_sql = f"SELECT COUNT(*) FROM refund_order WHERE NOT ({pending_where})"
    stall = database.Stall(stage, n, DRAIN_STALL_SECONDS)

    def drained() -> bool:
        done = database.scalar(conn, done_sql)
        if done >= n:
            return True
        stall.check(done, daemon.log_path)
        return False

    emulator.reset()
    emu_cpu0 = emulator.cpu_seconds()
    with ExitStack() as stack:
        # K daemons of one merchant share its limits (wechat.qps_shared): each paces at its share.
        fleet = [
            stack.enter_context(DaemonProcess(OUT_DIR, raw, emulator.env(), name=f"gateway-{stage}-{i + 1}of{daemons}"))
            for i in range(daemons)
        ]
        daemon = fleet[0]  # named in the stall message
        cpu0 = [d.cpu_seconds() for d in fleet]
        wall = timed_wait(drained, timeout=7200, interval=0.5, what=f"{stage} to drain")
        cpu = sum(d.cpu_seconds() - c for d, c in zip(fleet, cpu0))
        peak = max(d.memory_mb()["VmHWM"] for d in fleet)
    stats = emulator.stats()
    return {
        "wall": wall,
        "cpu": cpu,
        "peak_rss": peak,
        "emulator": stats,
        "emulator_cpu": emulator.cpu_seconds() - emu_cpu0,
    }


def profile_in_process(emulator: EmulatorProcess, url: str, stage: str) -> tuple[float, Path | None]:
    """Drain again with a Runner in this process (what the daemon's tick runs), under pyinstrument if installed.

    pyinstrument samples the main thread: the claim, the wait for the calls, the write-back.
    """
    import os
    from contextlib import ExitStack

    from cancel_scanner.config import parse_config
    from cancel_scanner.engine.db import make_engine
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.gateway.wechat_channel import build_gateway
    from cancel_scanner.scanners import REGISTRY, build_stages

    env = emulator.env()
    config = parse_config(
        {"database_url": url, "wechat": emulator.wechat(), "jobs": configs.jobs(enabled=[stage])}, REGISTRY, env=env
    )
    with ExitStack() as stack:
        os.environ.update(env)
        gateway = build_gateway(config, stack)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        runner = Runner(engine, config, build_stages(config), gateway)
        stack.callback(runner.close)
        return profiling.profiled_drain(runner, stage, counted="done")


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--n", type=int, default=None, help="refunds (default 20,000: 133 s of applies at 150/s; --quick 1,000)"
    )
    p.add_argument(
        "--profile", action="store_true", help="also drain in-process under pyinstrument (bench/out/profile-*)"
    )
    p.add_argument("--pace", type=float, default=1.0, help="client pace as a fraction of the limit (jobs.yaml: 1.0)")
    p.add_argument("--batch-size", type=int, default=None, help="gateway stages' batch_size (jobs.yaml: 200)")
    p.add_argument("--concurrency", type=int, default=None, help="gateway stages' concurrency (jobs.yaml: 16)")
    p.add_argument("--latency", type=float, default=GATEWAY_LATENCY_SECONDS, help="seconds per call at the emulator")
    p.add_argument("--daemons", type=int, default=1, help="daemons of the one merchant at once (they share its limits)")
    args = reporting.arguments(p)
    n = reporting.size(args, "n", quick=1_000, full=20_000)
    job_knobs = {k: v for k, v in (("batch_size", args.batch_size), ("concurrency", args.concurrency)) if v}
    knobs = {"apply_qps": WECHAT_APPLY_QPS * args.pace, "query_qps": WECHAT_QUERY_QPS * args.pace, "job": job_knobs}
    job = configs.jobs(**{s: job_knobs for s in ("submit_refund", "poll_refund")})
    concurrency = {s: job[s]["concurrency"] for s in ("submit_refund", "poll_refund")}
    settings = "".join(
        f", {label} {value}"
        for label, value in (
            ("client pace x", args.pace if args.pace != 1.0 else None),
            ("batch_size", args.batch_size),
            ("concurrency", args.concurrency),
            ("daemons", args.daemons if args.daemons != 1 else None),
        )
        if value
    )
    report = reporting.Report(
        f"Gateway stages: {n:,} refunds, {args.latency * 1000:.0f} ms per call, limits {WECHAT_APPLY_QPS}/{WECHAT_QUERY_QPS} QPS{settings}"
    )

    with (
        database.Bench(report=report) as bench,
        EmulatorProcess(latency=args.latency, log_name="gateway-emulator") as emulator,
    ):
        rtt = latency_check(emulator)
        print(f"one call, sequential: {rtt * 1000:.1f} ms (emulator latency {args.latency * 1000:.0f} ms)", flush=True)
        url, _engine = bench.database("bench_gateway")
        conn = bench.connect("bench_gateway")
        seed.orders(conn, 1, n, "refunding")
        seed.requests(conn, 1, n, "finished")
        seed.refunds(conn, 1, n, "submit")
        seed.oplog(conn, 1, n, ("CANCELLED",))
        seed.analyze(conn)
        database.wait_for_purge(conn)

        print(f"[submit_refund] draining {n:,} refunds", flush=True)
        submit = drain(emulator, url, conn, "submit_refund", "submit_scanned = 0", n, knobs, args.daemons)
        accepted = database.scalar(
            conn, "SELECT COUNT(*) FROM refund_order WHERE submit_scanned = 1 AND submit_success = 1"
        )

        # The first poll is poll_delays_seconds[0] (60 s) after acceptance: make it due now.
        database.sql(
            conn, "UPDATE refund_order SET next_attempt_at = NOW(3) - INTERVAL 1 SECOND WHERE submit_success = 1"
        )
        database.wait_for_purge(conn)
        print(f"[poll_refund] draining {accepted:,} refunds", flush=True)
        poll = drain(
            emulator,
            url,
            conn,
            "poll_refund",
            "submit_success = 1 AND progress_scanned = 0",
            accepted,
            knobs,
            args.daemons,
        )
        succeeded = database.scalar(
            conn, "SELECT COUNT(*) FROM refund_order WHERE progress_scanned = 1 AND progress_success = 1"
        )
        profiled = {}
        if args.profile:
            # Again, in this process: the emulator answers a replayed refund number with the same refund.
            database.sql(
                conn,
                "UPDATE refund_order SET submit_scanned = 0, submit_success = 0, progress_scanned = 0, "
                "progress_success = 0, wx_status = NULL, next_attempt_at = NOW(3) - INTERVAL 1 SECOND",
            )
            database.sql(conn, "DELETE FROM goods_order2_oplog WHERE event = 'REFUND_SUBMITTED'")
            database.wait_for_purge(conn)
            profiled["submit_refund"] = profile_in_process(emulator, url, "submit_refund")
            database.sql(
                conn, "UPDATE refund_order SET next_attempt_at = NOW(3) - INTERVAL 1 SECOND WHERE submit_success = 1"
            )
            database.wait_for_purge(conn)
            profiled["poll_refund"] = profile_in_process(emulator, url, "poll_refund")
            for stage, (rate, out) in profiled.items():
                print(f"[{stage}] in-process under the profiler: {rate:,.1f} rows/s; {out}", flush=True)
        conn.close()

    rows, peak = [], 0.0
    for stage, kind, limit, d, finished in (
        ("submit_refund", "apply", WECHAT_APPLY_QPS, submit, accepted),
        ("poll_refund", "query", WECHAT_QUERY_QPS, poll, succeeded),
    ):
        s = d["emulator"][kind]
        rate = s["steady_per_second"]
        bound = min(limit, concurrency[stage] / max(rtt, args.latency))
        rows.append(
            [
                stage,
                finished,
                kind,
                s["ok_per_second"],
                rate,
                limit,
                rate / limit if rate else None,
                s["busiest_1s_all"],
                s["http_429"],
                s["requests"],
                bound,
                d["cpu"] * 1e6 / max(1, finished),
                d["emulator_cpu"] * 1e6 / max(1, finished),
                d["peak_rss"],
            ]
        )
        peak = max(peak, d["peak_rss"])
    report.table(
        f"Gateway stages, {n:,} refunds; emulator latency {args.latency * 1000:.0f} ms "
        f"(sequential round trip measured {rtt * 1000:.1f} ms); concurrency {concurrency['submit_refund']}",
        [
            "stage",
            "rows done",
            "call",
            "calls/s (all)",
            "calls/s (middle 90%)",
            "limit",
            "x limit",
            "busiest 1 s (all arrivals)",
            "429s",
            "calls made",
            "concurrency/latency bound",
            "daemon CPU ms / 1k rows",
            "emulator CPU ms / 1k rows",
            "daemon peak RSS MB",
        ],
        rows,
    )
    for row in rows:
        stage, x_limit, n429 = row[0], row[6], row[8]
        report.target(
            f"{stage} pace",
            f"{x_limit:.3f} x limit ({row[4]:.1f}/s of {row[5]}; all calls {row[3]:.1f}/s)",
            f">= {LIMIT_RATIO_TARGET} x limit",
            x_limit is not None and x_limit >= LIMIT_RATIO_TARGET,
        )
        report.target(f"{stage} 429s", f"{n429}", "0", n429 == 0)
    report.target(
        "daemon peak RSS (gateway drains)",
        f"{peak:.0f} MB",
        f"<= {PEAK_RSS_TARGET_MB:.0f} MB",
        peak <= PEAK_RSS_TARGET_MB,
    )
    if accepted != n or succeeded != accepted:
        report.note(
            f"only {accepted:,} of {n:,} refunds accepted and {succeeded:,} succeeded: see bench/out/gateway-*.log"
        )
    report.note(
        "calls/s (all) = (accepted calls - 1) / (last - first arrival) at the emulator, retries after a 429 included; "
        "calls/s (middle 90%) = the same between the 5th and the 95th percentile arrival (the pace held, the target's "
        "figure); busiest 1 s = most arrivals, "
        "429s included, in any one-second window (the emulator answers 429 to those over the limit). Poll rows were made due at once instead of "
        f"waiting poll_delays_seconds[0]. N = {n:,} rather than 100,000: the stages are paced, so the rate is "
        "reached within seconds and 100,000 would only add 13 minutes of the same."
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
