"""The WeChat Pay emulator in its own process, for benchmarks (not a test, not the CLI's `emulator`).

The benchmarks run the daemon as a real subprocess in live mode pointed at this
emulator, so the daemon's CPU and memory are its own and the emulator's signing
does not share the daemon's GIL.

Per-call latency: the emulator has no latency option; a "slow" fault that
strikes before the refund is recorded with probability 1 is one (the request
waits ``--latency`` seconds, then is processed and answered normally, 200).

Protocol: prints one JSON line (base_url, key files, ids) when listening, then
reads commands on stdin, one per line, and answers each with one JSON line:
``stats`` (requests by call and status, rates, the busiest one-second window),
``reset`` (forget the counts), ``quit``. EOF on stdin stops it too.

    python bench/emulator_server.py --latency 0.02 --apply-qps 150 --query-qps 300
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from collections import Counter, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger  # noqa: E402

from cancel_scanner.gateway.emulator import Emulator, FaultPlan  # noqa: E402
from cancel_scanner.gateway.keys import generate_key_material  # noqa: E402

REQUEST_LOG_ROWS = 2_000_000


def _busiest_window(times: list[float], width: float = 1.0) -> int:
    """Most requests whose arrival times fall in any half-open window of ``width`` seconds."""
    best = 0
    for i, t in enumerate(times):
        j = bisect.bisect_left(times, t + width, lo=i)
        best = max(best, j - i)
    return best


def stats(emulator: Emulator) -> dict:
    with emulator._changed:  # the emulator appends under this lock
        log = list(emulator.request_log)
    out: dict = {}
    for kind in ("apply", "query"):
        rows = [(t, status) for t, _method, k, status in log if k == kind]
        by_status = Counter(status for _t, status in rows)
        ok = sorted(t for t, status in rows if status == 200)
        accepted_arrivals = sorted(t for t, status in rows if status != 429)
        span = ok[-1] - ok[0] if len(ok) > 1 else 0.0
        # The middle 90 % of accepted calls: the pace held, without start-up and the tail of retries.
        lo, hi = int(0.05 * len(ok)), int(0.95 * len(ok)) - 1
        steady_span = ok[hi] - ok[lo] if hi > lo else 0.0
        out[kind] = {
            "requests": len(rows),
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "ok": len(ok),
            "http_429": by_status.get(429, 0),
            "first": ok[0] if ok else None,
            "last": ok[-1] if ok else None,
            # (n-1)/span: n arrivals bound n-1 intervals
            "ok_per_second": (len(ok) - 1) / span if span > 0 else None,
            "steady_per_second": (hi - lo) / steady_span if steady_span > 0 else None,
            "busiest_1s_window": _busiest_window(accepted_arrivals),
            # every arrival, 429s included: how far over the limit the client's pace went
            "busiest_1s_all": _busiest_window(sorted(t for t, _status in rows)),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every call (0: none)")
    parser.add_argument("--apply-qps", type=int, default=150, help="limit; 0: none")
    parser.add_argument("--query-qps", type=int, default=300, help="limit; 0: none")
    parser.add_argument("--success-delay", type=float, default=0.0, help="seconds from PROCESSING to SUCCESS")
    parser.add_argument("--key-dir", type=Path, default=None)
    args = parser.parse_args()

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    key_dir = args.key_dir or Path(tempfile.mkdtemp(prefix="bench-emulator-keys-"))
    keys = generate_key_material(key_dir)
    faults = FaultPlan(p_slow=1.0, slow_seconds=args.latency, after_commit=0.0, seed=1) if args.latency > 0 else None
    emulator = Emulator(
        keys,
        success_delay=args.success_delay,
        apply_qps=args.apply_qps or None,
        query_qps=args.query_qps or None,
        faults=faults,
    )
    emulator.request_log = deque(maxlen=REQUEST_LOG_ROWS)
    emulator.start()
    assert keys.paths is not None
    print(
        json.dumps(
            {
                "base_url": emulator.base_url,
                "mchid": keys.mchid,
                "appid": keys.appid,
                "merchant_serial_no": keys.merchant_serial_no,
                "platform_public_key_id": keys.platform_public_key_id,
                "merchant_private_key_file": str(keys.paths.merchant_private_key),
                "platform_public_key_file": str(keys.paths.platform_public_key),
                "apiv3_key_file": str(keys.paths.apiv3_key),
                "key_dir": str(key_dir),
            }
        ),
        flush=True,
    )
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(json.dumps(stats(emulator)), flush=True)
            elif command == "reset":
                with emulator._changed:
                    emulator.request_log.clear()
                    emulator.requests.clear()
                print(json.dumps({"ok": True}), flush=True)
            elif command == "quit":
                break
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
