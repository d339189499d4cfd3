"""Pytest fixtures for the refund gateway: key material, a live emulator on a loopback port, a real gateway.

Registered from tests/conftest.py (`pytest_plugins = ["tests.gateway_fixtures"]`).
The emulator runs on `emulator_clock`, a clock the test moves by hand: status
changes are driven with `emulator_clock.advance(seconds)`, never by sleeping.
Signature timestamps stay on the real clock (the SDK signs with it), so the
test clock may be moved by hours without tripping the 300 s skew check.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cancel_scanner.gateway.emulator import Emulator
from cancel_scanner.gateway.keys import KeyMaterial, generate_key_material, write_key_material
from cancel_scanner.gateway.sandbox import client_for
from cancel_scanner.gateway.wechat import WeChatPayGateway
from testsupport.emulator_faults import EmulatorFaults

TEST_TIMEOUT_SECONDS = (1.0, 1.0)  # connect, read: a lost answer fails a test in a second, not fifteen
STRAY_HOST = "127.0.0.2"  # another loopback host: where a redirect points, and where nothing may arrive


class FakeClock:
    """Epoch seconds that move only when told; starts at the real time so refund times look real."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@functools.cache
def session_keys() -> KeyMaterial:
    """One set of key material for the whole test process: two 2048-bit RSA pairs cost a few tenths
    of a second, and the sandboxes and emulators of a run number in the hundreds. A test that needs
    keys other than these (a stranger's) still calls generate_key_material() itself."""
    return generate_key_material()


def session_keys_in(directory: Path) -> KeyMaterial:
    """The session's keys written to ``directory`` as generate_key_material(directory) writes them,
    with their paths (a live-mode daemon reads them from there)."""
    keys = session_keys()
    return replace(keys, paths=write_key_material(keys, Path(directory)))


@pytest.fixture(scope="session")
def key_material() -> KeyMaterial:
    return session_keys()


@pytest.fixture
def emulator_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emulator(key_material: KeyMaterial, emulator_clock: FakeClock) -> Iterator[Emulator]:
    faults = EmulatorFaults()  # fail_next, spoil_next_download, faults.plan (testsupport/emulator_faults.py)
    with Emulator(key_material, clock=emulator_clock, wire_clock=time.time, success_delay=0.5, faults=faults) as emu:
        yield emu


def build_gateway(keys: KeyMaterial, base_url: str, **overrides: Any) -> WeChatPayGateway:
    return client_for(keys, base_url, **{"timeout": TEST_TIMEOUT_SECONDS, **overrides})


@pytest.fixture
def make_gateway(key_material: KeyMaterial, emulator: Emulator) -> Iterator[Callable[..., WeChatPayGateway]]:
    """Build a gateway against the emulator with some parameters changed, e.g. make_gateway(apply_qps=100)."""
    built: list[WeChatPayGateway] = []

    def make(**overrides: Any) -> WeChatPayGateway:
        gateway = build_gateway(key_material, emulator.base_url, **overrides)
        built.append(gateway)
        return gateway

    yield make
    for gateway in built:
        gateway.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., WeChatPayGateway]) -> WeChatPayGateway:
    return make_gateway()


class StrayServer(ThreadingHTTPServer):
    """A tiny HTTP server that records every request it gets (method, path) and answers 200."""

    daemon_threads = True

    def __init__(self, host: str = STRAY_HOST) -> None:
        self.seen: list[tuple[str, str]] = []
        self.seen_lock = threading.Lock()
        super().__init__((host, 0), _StrayHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _StrayHandler(BaseHTTPRequestHandler):
    server: StrayServer

    def _record(self) -> None:
        with self.server.seen_lock:
            self.server.seen.append((self.command, self.path))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _record  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stray_server() -> Iterator[StrayServer]:
    """A server on another loopback host, e.g. for a redirect to point at; tests assert what it saw."""
    server = StrayServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
