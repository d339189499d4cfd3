"""`cancel-scanner emulator` prints where it listens and its key files, serves, and stops on SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def read_lines(proc, count: int, timeout: float) -> list[str]:
    """The first ``count`` lines of stdout, or fail after ``timeout`` seconds."""
    found: queue.Queue[str | None] = queue.Queue()

    def pump():
        for line in proc.stdout:
            found.put(line.strip())
        found.put(None)

    threading.Thread(target=pump, daemon=True).start()
    lines, deadline = [], time.monotonic() + timeout
    while len(lines) < count:
        try:
            line = found.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"only {lines!r} within {timeout}s") from None
        assert line is not None, f"emulator exited early with {proc.poll()}"
        lines.append(line)
    return lines


def test_the_emulator_command_prints_its_address_and_key_paths_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "emulator", "--port", "0", "--key-dir", str(tmp_path / "keys")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        lines = read_lines(proc, 8, timeout=30)
        assert lines[0].startswith("listening on http://127.0.0.1:")
        url = lines[0].split()[-1]
        facts = dict(line.split(" ", 1) for line in lines[1:])
        key_file = Path(facts["merchant_private_key_file"])
        assert key_file.is_file() and key_file.parent == tmp_path / "keys"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        apiv3 = Path(facts["apiv3_key_file"]).read_text().strip()
        assert apiv3 not in "\n".join(lines)  # the key's path is printed, never the key

        # It speaks the protocol: an unsigned request is refused as WeChat would.
        answer = requests.get(f"{url}/v3/refund/domestic/refunds/R1", timeout=5)
        assert answer.status_code == 401 and answer.json()["code"] == "SIGN_ERROR"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
