"""Gateway round trips per second: apply + query through the real SDK against the emulator.

Not a test. The emulator's QPS limits are off and the client's pace is huge,
so the figure is what signing, verifying, HTTP and the emulator cost on this
machine, i.e. the ceiling the submit and poll stages could ever reach here
(WeChat's own limits, 150 applies/s, are far below it).

    PYTHONPATH=. python bench/gateway_roundtrip.py --seconds 5 --threads 8 [--no-reuse]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from loguru import logger

from bench.emulator_server import unlimited_sandbox
from cancel_scanner.gateway.contract import Accepted, RefundRequest

HUGE_QPS = 1_000_000


def run(seconds: float, threads: int, reuse_connections: bool) -> tuple[int, int, float]:
    """Returns (round trips, failures, elapsed seconds)."""
    sandbox = unlimited_sandbox(
        apply_qps=HUGE_QPS, query_qps=HUGE_QPS, timeout=(5.0, 15.0), reuse_connections=reuse_connections
    )
    numbers = itertools.count()
    counts_lock = threading.Lock()
    done = failed = 0
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            n = next(numbers)
            applied = sandbox.gateway.apply(RefundRequest(f"BENCH{n}", f"ORDER{n}", 100, 100))
            queried = sandbox.gateway.query(f"BENCH{n}")
            ok = isinstance(applied, Accepted) and isinstance(queried, Accepted)
            with counts_lock:
                done += ok
                failed += not ok

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in range(threads):
                pool.submit(worker)
        elapsed = time.perf_counter() - started
        created = sandbox.emulator.refunds_created
        assert all(count == 1 for count in created.values()), "a refund was created twice"
    finally:
        sandbox.close()
    return done, failed, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--no-reuse", action="store_true", help="a new connection per call, as the bare SDK does")
    args = parser.parse_args()
    logger.remove()  # per-call DEBUG events would measure the terminal, not the gateway
    logger.add(sys.stderr, level="WARNING")

    done, failed, elapsed = run(args.seconds, args.threads, reuse_connections=not args.no_reuse)
    mode = "new connection per call" if args.no_reuse else "keep-alive sessions"
    print(
        f"{done / elapsed:.0f} round trips/s (apply+query) - {done} in {elapsed:.1f} s, "
        f"{args.threads} threads, {mode}, {failed} failed"
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
