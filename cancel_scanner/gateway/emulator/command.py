"""The `cancel-scanner emulator` command (also `python -m cancel_scanner.gateway.emulator`): one emulator until a signal."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from cancel_scanner.gateway.keys import generate_key_material


def serve(host: str = "127.0.0.1", port: int = 0, key_dir: Path | None = None, **options: Any) -> int:
    """The `cancel-scanner emulator` command: serve until SIGTERM/SIGINT, then stop cleanly and return 0.

    ``options`` are the Emulator's (success_delay, apply_qps, query_qps, min_refund_interval, faults),
    with its defaults (WeChat's limits among them). The command passes no `faults` (it
    answers as WeChat does); a caller may pass fault hooks (gateway.emulator.hooks), e.g. a test's
    testsupport.emulator_faults.EmulatorFaults.

    Prints one line per fact a client needs; key files are named, never shown.
    Must run on the main thread (signal handlers).
    """
    from cancel_scanner.gateway.emulator import Emulator

    directory = Path(key_dir) if key_dir is not None else Path(tempfile.mkdtemp(prefix="cancel-scanner-emulator-"))
    keys = generate_key_material(directory)
    assert keys.paths is not None
    emulator = Emulator(keys, host=host, port=port, **options)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        emulator.start()
        for line in (
            f"listening on {emulator.base_url}",
            f"mchid {keys.mchid}",
            f"appid {keys.appid}",
            f"merchant_serial_no {keys.merchant_serial_no}",
            f"platform_public_key_id {keys.platform_public_key_id}",
            f"merchant_private_key_file {keys.paths.merchant_private_key}",
            f"platform_public_key_file {keys.paths.platform_public_key}",
            f"apiv3_key_file {keys.paths.apiv3_key}",
        ):
            print(line, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
