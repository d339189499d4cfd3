"""The emulator's refund notifications, received by NotifyServer through the real gateway's verifier.

Delivery is asynchronous; every wait is a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from cancel_scanner.gateway.contract import RefundRequest
from cancel_scanner.gateway.notify import NOTIFY_PATH, NotifyServer
from testsupport.waiting import wait_until

DEADLINE_SECONDS = 10


class Hook:
    """on_refund that records what it got and lets a test wait for it."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.calls = 0
        self._fail_first = fail_first
        self._cond = threading.Condition()

    def __call__(self, resource: dict[str, Any]) -> None:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
            if self.calls <= self._fail_first:
                raise RuntimeError("the database is briefly unavailable")
            self.received.append(resource)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


@pytest.fixture
def start_notify_server(gateway) -> Iterator[Callable[..., NotifyServer]]:
    servers: list[NotifyServer] = []

    def start(hook: Hook, **kwargs: Any) -> NotifyServer:
        server = NotifyServer(gateway, hook, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def attempts(emulator, number: str) -> list[int | None]:
    return [a.status for a in emulator.notifications if a.out_refund_no == number]


def apply_and_finish(make_gateway, emulator_clock, notify_url: str, number: str = "R1", order: str = "O1") -> None:
    gateway = make_gateway(notify_url=notify_url)
    result = gateway.apply(RefundRequest(number, order, 1280, 1280))
    assert result.refund.status == "PROCESSING"
    emulator_clock.advance(1)  # past success_delay; the emulator's ticker notices and notifies


def notified(start_notify_server, make_gateway, emulator_clock, hook: Hook | None = None, **server: Any) -> Hook:
    """A hook behind a notify server, and one refund (R1) applied and finished, so WeChat announces it."""
    hook = hook or Hook()
    apply_and_finish(make_gateway, emulator_clock, start_notify_server(hook, **server).url)
    return hook


def test_a_successful_refund_is_announced_verified_and_decrypted(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    hook = notified(start_notify_server, make_gateway, emulator_clock)

    assert hook.wait_for(lambda: len(hook.received) == 1)
    resource = hook.received[0]
    assert resource["out_refund_no"] == "R1"
    assert resource["refund_status"] == "SUCCESS"
    assert resource["amount"]["refund"] == 1280
    assert resource["mchid"] == emulator.keys.mchid
    assert resource["success_time"].endswith("+08:00")
    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204], DEADLINE_SECONDS)


def test_a_notification_delivered_twice_reaches_the_hook_once(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    emulator.duplicate_notifications = True

    hook = notified(start_notify_server, make_gateway, emulator_clock)

    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204, 200], DEADLINE_SECONDS)
    ids = {a.notification_id for a in emulator.notifications}
    assert len(ids) == 1
    assert hook.calls == 1


def test_closed_and_abnormal_refunds_are_announced_as_such(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook()
    server = start_notify_server(hook)
    emulator.close_refunds_for("R-CLOSED")
    emulator.abnormal_for("R-ABNORMAL")
    gateway = make_gateway(notify_url=server.url)

    gateway.apply(RefundRequest("R-CLOSED", "O1", 100, 100))
    gateway.apply(RefundRequest("R-ABNORMAL", "O2", 100, 100))
    emulator_clock.advance(1)

    assert hook.wait_for(lambda: len(hook.received) == 2)
    statuses = {r["out_refund_no"]: r["refund_status"] for r in hook.received}
    assert statuses == {"R-CLOSED": "CLOSED", "R-ABNORMAL": "ABNORMAL"}
    assert emulator.wait_for(
        lambda: {a.event_type for a in emulator.notifications} == {"REFUND.CLOSED", "REFUND.ABNORMAL"}, DEADLINE_SECONDS
    )

    emulator.resolve_abnormal("R-ABNORMAL")

    assert hook.wait_for(lambda: len(hook.received) == 3)
    assert hook.received[2]["refund_status"] == "SUCCESS"


def test_a_notification_with_a_bad_signature_is_refused_until_a_genuine_one_comes(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    emulator.send_bad_signature_notifications = True

    hook = notified(start_notify_server, make_gateway, emulator_clock)

    assert emulator.wait_for(lambda: attempts(emulator, "R1")[:1] == [401], DEADLINE_SECONDS)
    assert hook.calls == 0

    emulator.send_bad_signature_notifications = False  # WeChat's next retry is genuine

    assert hook.wait_for(lambda: len(hook.received) == 1)
    assert emulator.wait_for(lambda: attempts(emulator, "R1")[-1:] == [204], DEADLINE_SECONDS)
    assert set(attempts(emulator, "R1")[:-1]) == {401}


def test_a_stale_notification_is_refused(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = notified(start_notify_server, make_gateway, emulator_clock, clock=lambda: time.time() + 301)

    assert emulator.wait_for(lambda: len(attempts(emulator, "R1")) >= 2, DEADLINE_SECONDS)
    assert set(attempts(emulator, "R1")) == {401}
    assert hook.calls == 0


def test_a_failing_hook_answers_500_and_the_retry_is_taken(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = notified(start_notify_server, make_gateway, emulator_clock, Hook(fail_first=1))

    assert hook.wait_for(lambda: len(hook.received) == 1)
    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [500, 204], DEADLINE_SECONDS)
    assert hook.calls == 2


def test_forged_or_malformed_posts_are_refused_without_calling_the_hook(start_notify_server, key_material):
    hook = Hook()
    server = start_notify_server(hook)
    body = json.dumps({"id": "x", "event_type": "REFUND.SUCCESS", "resource": {}}).encode()
    now = str(int(time.time()))
    forged = {
        "Wechatpay-Timestamp": now,
        "Wechatpay-Nonce": "N",
        "Wechatpay-Signature": "AAAA",
        "Wechatpay-Serial": key_material.platform_public_key_id,
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
    }

    answers = [
        requests.post(server.url, data=body, headers=forged, timeout=2).status_code,
        requests.post(server.url, data=body, headers={**forged, "Wechatpay-Serial": "ABC123"}, timeout=2).status_code,
        requests.post(server.url, data=body, headers={}, timeout=2).status_code,
        requests.post(server.url, data=b"not json", headers=forged, timeout=2).status_code,
    ]

    assert answers == [401, 401, 401, 401]
    assert hook.calls == 0


# -- adversarial clients ---------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IDLE_CONNECTIONS = 1500
SERVER_FD_LIMIT = 1024
THREAD_BOUND = 40
SERVE_WITHIN_SECONDS = 5.0


def notify_address(server_url: str) -> tuple[str, int]:
    parts = urlsplit(server_url)
    return parts.hostname or "", parts.port or 80


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 3.0) -> bytes:
    """Send data as is, then read until the server closes (or timeout); returns what came back."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1])


def open_idle(address: tuple[str, int], count: int) -> list[socket.socket]:
    """count non-blocking connects; none of them ever sends a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(address)
        sockets.append(sock)
    return sockets


def established(sockets: list[socket.socket], timeout: float) -> int:
    """How many connects completed within timeout (epoll: these descriptors are past select()'s 1024)."""
    pending = set(sockets)
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline, done = time.monotonic() + timeout, 0
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fileobj)
                pending.discard(key.fileobj)
                done += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return done


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_body_over_the_cap_is_refused_from_its_headers_without_reading_it(start_notify_server):
    hook = Hook()
    server = start_notify_server(hook)
    head = f"POST {NOTIFY_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n"

    began = time.monotonic()
    answer = raw_exchange(notify_address(server.url), head.encode() + b"x" * 1024)  # 1 KiB of the 10 MiB

    assert status_of(answer) == 413
    assert b"Connection: close" in answer
    assert time.monotonic() - began < 2.0  # answered and closed without waiting for the rest
    assert hook.calls == 0


def test_a_chunked_body_is_refused(start_notify_server):
    server = start_notify_server(Hook())
    request = f"POST {NOTIFY_PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

    assert status_of(raw_exchange(notify_address(server.url), request.encode())) == 411


def test_past_the_connection_cap_the_longest_idle_are_shed_and_a_notification_still_gets_through(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    hook = Hook()
    server = start_notify_server(hook, max_connections=8, workers=2)
    threads_before = threading.active_count()
    idle = open_idle(notify_address(server.url), 40)
    try:
        assert established(idle, DEADLINE_SECONDS) == 40
        wait_until(
            lambda: sum(peer_closed(s) for s in idle),
            DEADLINE_SECONDS,
            "the server to shed past its cap (32 of 40 closed)",
            until=lambda closed: closed >= 32,
            interval=0.02,
        )
        assert server.open_connections <= 8
        assert threading.active_count() == threads_before  # no thread per connection

        apply_and_finish(make_gateway, emulator_clock, server.url)

        assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204], DEADLINE_SECONDS)
        assert not any(peer_closed(s) for s in idle[-7:])  # the newest idle ones made way, not were shed
    finally:
        for sock in idle:
            sock.close()
    # All but the emulator's kept-alive connection, which waits out the idle timeout (HTTP/1.1 keep-alive).
    wait_until(
        lambda: server.open_connections,
        DEADLINE_SECONDS,
        "at most one connection left open",
        until=lambda left: left <= 1,
        interval=0.02,
    )


def test_a_silent_or_trickling_client_is_cut_off_after_the_idle_timeout_while_others_are_served(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    idle_timeout = 1.5
    hook = Hook()
    server = start_notify_server(hook, idle_timeout=idle_timeout)
    address = notify_address(server.url)
    # 400 bytes at 20 bytes/s: 20 s of headers, far past the timeout. A per-byte inactivity timer
    # would never fire; the deadline covers the whole request.
    head = f"POST {NOTIFY_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Pad: ".encode().ljust(400, b"a")
    clients = [socket.create_connection(address, timeout=2) for _ in range(3)]
    opened = time.monotonic()
    cut_at: dict[int, float] = {}
    sent = [0] * len(clients)
    stop = threading.Event()

    def trickle() -> None:
        while len(cut_at) < len(clients) and not stop.wait(0.05):
            for n, sock in enumerate(clients):
                if n in cut_at:
                    continue
                sock.setblocking(False)
                gone = peer_closed(sock)
                sock.setblocking(True)
                try:
                    if not gone and n > 0:  # client 0 stays silent, the others trickle
                        sock.send(head[sent[n] : sent[n] + 1])
                        sent[n] += 1
                except OSError:
                    gone = True
                if gone:
                    cut_at[n] = time.monotonic() - opened

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        wait_until(
            lambda: min(sent[1:]),
            DEADLINE_SECONDS,
            "every trickler to have sent 3 bytes",
            until=lambda n: n >= 3,
            interval=0.02,
        )

        apply_and_finish(make_gateway, emulator_clock, server.url)
        assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204], DEADLINE_SECONDS)
        served_at = time.monotonic() - opened

        trickler.join(timeout=idle_timeout + 6)
    finally:
        stop.set()
        for sock in clients:
            sock.close()

    assert sorted(cut_at) == [0, 1, 2], f"not cut off: {sorted(set(range(3)) - set(cut_at))}"
    assert all(idle_timeout * 0.9 <= at <= idle_timeout + 2.0 for at in cut_at.values()), cut_at
    assert max(sent) < len(head)  # cut off in the middle of its headers
    assert served_at < min(cut_at.values())  # the notification was answered while they were all still there


# A NotifyServer in its own process, so its descriptor limit and thread count are its own.
SERVER_SCRIPT = """
import json, resource, sys, time
from cancel_scanner.gateway.keys import KeyMaterial
from cancel_scanner.gateway.notify import NotifyServer
from cancel_scanner.gateway.sandbox import client_for

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
keys = KeyMaterial(**json.loads(sys.stdin.readline()))
verifier = client_for(keys, "http://127.0.0.1:9")  # verifying a notification needs no call to WeChat
server = NotifyServer(verifier, lambda refund: print("REFUND", refund["out_refund_no"], flush=True)).start()
print("URL", server.url, flush=True)
sys.stdin.readline()
began = time.monotonic()
server.stop()
print("STOPPED", time.monotonic() - began, flush=True)
"""


class ServerProcess:
    def __init__(self, keys, stderr_path: Path) -> None:
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(SERVER_FD_LIMIT)],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._stderr_path = stderr_path
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(json.dumps({k: v for k, v in dataclasses.asdict(keys).items() if k != "paths"}))
        self.url = self.expect("URL").split()[1]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = DEADLINE_SECONDS) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line from the server process; its stderr ends: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text(errors="replace")[-2000:]

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def fd_limit(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise AssertionError("no open-files limit in /proc")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE_SECONDS)
        self._stderr.close()


class Sampler:
    """Highest thread and descriptor counts of a process, read from /proc while the test runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.threads = self.files = 0
        self._server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.threads = max(self.threads, self._server.status("Threads"))
                self.files = max(self.files, self._server.open_files())
            except (OSError, AssertionError):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DEADLINE_SECONDS)


@pytest.fixture
def descriptor_headroom() -> Iterator[None]:
    """Room in this process for the idle sockets; fails (not skips) where the hard limit forbids it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(
            f"this test needs {needed} open files in the test process; the hard limit is {hard} (raise ulimit -Hn)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1500_idle_connections_under_a_1024_file_limit_cost_no_threads_and_a_notification_is_served(
    descriptor_headroom, key_material, make_gateway, emulator, emulator_clock, tmp_path, record_property
):
    server = ServerProcess(key_material, tmp_path / "server.stderr")
    idle: list[socket.socket] = []
    try:
        assert server.fd_limit() == SERVER_FD_LIMIT
        files_at_rest = server.open_files()
        sampler = Sampler(server)
        idle = open_idle(notify_address(server.url), IDLE_CONNECTIONS)
        connected = established(idle, DEADLINE_SECONDS)
        gateway = make_gateway(notify_url=server.url)
        gateway.apply(RefundRequest("R1", "O1", 1280, 1280))

        began = time.monotonic()
        emulator_clock.advance(1)  # the emulator now signs and sends REFUND.SUCCESS to the server process
        delivered = emulator.wait_for(lambda: attempts(emulator, "R1") != [], DEADLINE_SECONDS)
        serve_seconds = time.monotonic() - began
        sampler.stop()
        record_property("threads_with_idle_connections", sampler.threads)
        record_property("open_files_with_idle_connections", sampler.files)
        record_property("seconds_to_serve_notification", round(serve_seconds, 3))
        print(f"threads {sampler.threads}, open files {sampler.files}, served in {serve_seconds:.3f} s")

        assert sampler.threads < THREAD_BOUND, f"{sampler.threads} threads for {IDLE_CONNECTIONS} idle connections"
        assert connected == IDLE_CONNECTIONS, f"only {connected} of {IDLE_CONNECTIONS} connects completed"
        assert delivered and attempts(emulator, "R1") == [204], f"attempts {attempts(emulator, 'R1')}"
        assert serve_seconds < SERVE_WITHIN_SECONDS
        server.expect("REFUND R1")
        assert sampler.files < SERVER_FD_LIMIT - 100  # the connection cap, not the file limit, bounds it

        for sock in idle:
            sock.close()
        wait_until(
            server.open_files,
            DEADLINE_SECONDS,
            f"the files the clients held closed ({files_at_rest} at rest, 2 more allowed)",
            until=lambda files: files <= files_at_rest + 2,
            interval=0.02,
        )
        assert server.status("Threads") < THREAD_BOUND

        idle = open_idle(notify_address(server.url), 300)  # stop() must not wait on idle connections
        assert established(idle, DEADLINE_SECONDS) == 300
        server.send("stop")
        assert float(server.expect("STOPPED").split()[1]) < 3.0
    finally:
        for sock in idle:
            sock.close()
        server.close()
