"""The WeChat Pay emulator in its own process, for benchmarks (not a test, not the CLI's `emulator`),
and ``EmulatorProcess``, the benchmarks' end of it.

The benchmarks run the daemon as a real subprocess in live mode pointed at this
emulator, so the daemon's CPU and memory are its own and the emulator's signing
does not share the daemon's GIL.

Per-call latency: a "slow" fault that strikes before the refund is recorded, with
probability 1 (the request waits ``--latency`` seconds, then is processed and
answered normally, 200). Not the emulator's own ``latency``, which waits before
the QPS check: here a call over the limit is answered 429 at once, as in every
figure of RESULTS.md so far.

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
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from bench import OUT_DIR, REPO
from cancel_scanner.gateway.emulator import Emulator
from cancel_scanner.gateway.keys import generate_key_material
from cancel_scanner.gateway.sandbox import Sandbox, start_sandbox
from testsupport.emulator_faults import EmulatorFaults, FaultPlan
from testsupport.processes import process_cpu_seconds

REQUEST_LOG_ROWS = 2_000_000
# WeChat Pay's per-merchant limits and the per-call latency the benchmarks measure against.
WECHAT_APPLY_QPS = 150
WECHAT_QUERY_QPS = 300
GATEWAY_LATENCY_SECONDS = 0.020


def unlimited_sandbox(**client_options: Any) -> Sandbox:
    """The in-process sandbox (start_sandbox) with every limit off: the emulator's on refunds and payments,
    the client's paces (``client_options`` may set them, and the client's other options), answers at once."""
    sandbox = start_sandbox(
        success_delay=0,
        emulator_apply_qps=None,
        emulator_query_qps=None,
        **{"apply_qps": None, "query_qps": None, "pay_query_qps": None, "pay_close_qps": None, **client_options},
    )
    sandbox.emulator.payment_qps = None
    return sandbox


def _busiest_window(times: list[float], width: float = 1.0) -> int:
    """Most requests whose arrival times fall in any half-open window of ``width`` seconds."""
    best = 0
    for i, t in enumerate(times):
        j = bisect.bisect_left(times, t + width, lo=i)
        best = max(best, j - i)
    return best


def stats(emulator: Emulator) -> dict:
    """Per call (apply, query): requests by status, accepted ones per second, the busiest one-second windows."""
    log = emulator.logged_requests()
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
    """Serve until ``quit`` or EOF on stdin, answering the protocol's commands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every call (0: none)")
    parser.add_argument("--apply-qps", type=int, default=WECHAT_APPLY_QPS, help="limit; 0: none")
    parser.add_argument("--query-qps", type=int, default=WECHAT_QUERY_QPS, help="limit; 0: none")
    parser.add_argument("--success-delay", type=float, default=0.0, help="seconds from PROCESSING to SUCCESS")
    parser.add_argument("--key-dir", type=Path, default=None)
    args = parser.parse_args()

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    key_dir = args.key_dir or Path(tempfile.mkdtemp(prefix="bench-emulator-keys-"))
    keys = generate_key_material(key_dir)
    plan = FaultPlan(p_slow=1.0, slow_seconds=args.latency, after_commit=0.0, seed=1) if args.latency > 0 else None
    emulator = Emulator(
        keys,
        success_delay=args.success_delay,
        apply_qps=args.apply_qps or None,
        query_qps=args.query_qps or None,
        faults=EmulatorFaults(plan),
        request_log_size=REQUEST_LOG_ROWS,
    )
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
                emulator.forget_requests()
                print(json.dumps({"ok": True}), flush=True)
            elif command == "quit":
                break
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    finally:
        emulator.stop()
    return 0


class EmulatorProcess:
    """This module's main() in a subprocess, for a ``with`` block: WeChat's limits, a per-call latency, its own CPU."""

    def __init__(
        self,
        latency: float = GATEWAY_LATENCY_SECONDS,
        apply_qps: int | None = WECHAT_APPLY_QPS,
        query_qps: int | None = WECHAT_QUERY_QPS,
        success_delay: float = 0.0,
        log_name: str = "emulator",
    ) -> None:
        self.args = [
            "--latency",
            str(latency),
            "--apply-qps",
            str(apply_qps or 0),
            "--query-qps",
            str(query_qps or 0),
            "--success-delay",
            str(success_delay),
        ]
        self.log_path = OUT_DIR / f"{log_name}.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def __enter__(self) -> EmulatorProcess:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        log.close()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator did not start; see {self.log_path}")
        self.info = json.loads(line)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        shutil.rmtree(self.info.get("key_dir", ""), ignore_errors=True)
        self.proc = None

    def _command(self, command: str) -> dict:
        assert self.proc is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict:
        """The protocol's ``stats``: per call, requests by status, rates and the busiest one-second windows."""
        return self._command("stats")

    def reset(self) -> None:
        """Forget the requests counted so far, so the next stats are one measurement's."""
        self._command("reset")

    def cpu_seconds(self) -> float:
        """CPU time the emulator's process has used so far."""
        return process_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def wechat(self, apply_qps: float = WECHAT_APPLY_QPS, query_qps: float = WECHAT_QUERY_QPS) -> dict:
        """The `wechat:` section of a live-mode jobs.yaml pointing at this emulator."""
        i = self.info
        return {
            "mode": "live",
            "base_url": i["base_url"],
            "mchid": i["mchid"],
            "appid": i["appid"],
            "merchant_serial_no": i["merchant_serial_no"],
            "merchant_private_key_file": i["merchant_private_key_file"],
            "platform_public_key_file": i["platform_public_key_file"],
            "platform_public_key_id": i["platform_public_key_id"],
            "apply_qps": apply_qps,
            "query_qps": query_qps,
            "timeout_seconds": [5, 15],
        }

    def env(self) -> dict[str, str]:
        """The daemon's environment: the APIv3 key, which is never in a configuration file."""
        return {"WECHATPAY_APIV3_KEY": Path(self.info["apiv3_key_file"]).read_text(encoding="utf-8").strip()}


if __name__ == "__main__":
    sys.exit(main())
