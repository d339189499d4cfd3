"""A WeChat Pay API v3 refund emulator: a real HTTP server on a loopback port.

WeChat Pay v3 has no sandbox, so tests and the daemon's sandbox mode talk to
this instead. It behaves like the facts sheet's gateway on every point the
client can observe: signed requests and answers, idempotent refund numbers,
the error codes, the QPS limits, status moving with time, notifications. It
signs and verifies with `cryptography` directly rather than through the SDK,
so a signing bug in the client cannot be mirrored here and go unnoticed.

Choices a test writer should know:

* Wrong mchid in the Authorization header answers 404 MCH_NOT_EXISTS (the
  client's ConfigError path); wrong serial, signature or a timestamp more
  than `max_clock_skew` seconds from `clock()` answers 401 SIGN_ERROR.
* Faults (`fail_next`, or a random `FaultPlan`) are described in
  gateway.faults: errors, slow answers, dropped connections, bad signatures,
  redirects, answers trickled a byte at a time, huge answers. They strike
  before the refund is recorded (no money moves: the client's retry creates
  it) or, with `after_commit`, after it (money moved but the client hears
  something else: the dangerous case). A "slow" fault before commit means
  the request sat in a queue: it is still processed after the wait, so the
  client times out and money moves anyway, which is also what real gateways
  do.
* `force_status(out_refund_no, status)` rewrites a recorded refund's status
  (e.g. CLOSED after SUCCESS) for good, so later answers contradict earlier ones.
* `max_in_flight[out_refund_no]` is the most requests (applies and queries
  alike, from arrival until the answer has left) ever in progress at once
  for that number: the proof that two callers never raced on one refund.
  `in_flight(out_refund_no)` is the count right now (for `wait_for`).
* Three clocks. `clock` (epoch seconds) drives refund status and the times
  in refund objects; tests inject one and move it instead of sleeping.
  `wire_clock` (default: `clock`) is the one the timestamps on the wire are
  checked against and stamped with: request skew, answer and notification
  signatures. The SDK stamps requests with the real time, so a test that moves
  `clock` by more than `max_clock_skew` must pass `wire_clock=time.time`
  (tests/gateway_fixtures.py does). `monotonic` paces the QPS windows.
* Requests rejected for QPS do not count towards the window.
* `notify_url` may be plain http on a loopback host (WeChat requires https).
* A request that names only a transaction_id of an unknown payment, with
  strict_payments off, registers a payment whose out_trade_no is that id.
* Not emulated: the 6 QPS budget for failed applies, the one-year refund
  window. The one-minute gap between refunds of one order is off unless
  `min_refund_interval` is set, because the daemon's tests retry a CLOSED
  refund with a new number right away.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import random
import re
import secrets
import signal
import socket
import string
import sys
import tempfile
import threading
import time
import uuid
from base64 import b64decode, b64encode
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from loguru import logger

from gateway import faults
from gateway.faults import FAULT_KINDS, FaultPlan  # noqa: F401  (re-exported: tests and the sandbox import them from here)
from gateway.faults import DEFAULT_SLOW_SECONDS, ERRORS, Fault
from gateway.faults import Reply as _Reply
from gateway.faults import error_reply as _error
from gateway.keys import KeyMaterial, generate_key_material

REFUNDS_PATH = "/v3/refund/domestic/refunds"
AUTH_SCHEME = "WECHATPAY2-SHA256-RSA2048"
SUCCESS_DELAY_SECONDS = 0.5
MAX_CLOCK_SKEW_SECONDS = 300
APPLY_QPS = 150
QUERY_QPS = 300
QPS_WINDOW_SECONDS = 1.0
MAX_REFUNDS_PER_ORDER = 50
TICK_SECONDS = 0.05
# WeChat retries over 24 h (15 s ... 6 h); compressed so a test sees retries.
NOTIFY_RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
NOTIFY_TIMEOUT_SECONDS = (1.0, 5.0)
REQUEST_LOG_SIZE = 100_000
MAX_BODY_BYTES = 64 * 1024
BEIJING = timezone(timedelta(hours=8))
USER_RECEIVED_ACCOUNT = "支付用户零钱"

_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')
# What WeChat accepts; wider than what our client sends (see gateway.contract).
_OUT_REFUND_NO = re.compile(r"^[0-9A-Za-z_\-|*@]{1,64}$")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

STATUS_PROCESSING, STATUS_SUCCESS, STATUS_CLOSED, STATUS_ABNORMAL = "PROCESSING", "SUCCESS", "CLOSED", "ABNORMAL"
_EVENTS = {
    STATUS_SUCCESS: ("REFUND.SUCCESS", "退款成功"),
    STATUS_CLOSED: ("REFUND.CLOSED", "退款关闭"),
    STATUS_ABNORMAL: ("REFUND.ABNORMAL", "退款异常"),
}

_log = logger.bind(component="emulator")

Matcher = str | Callable[[dict[str, Any]], bool]


@dataclass
class _Payment:
    out_trade_no: str
    total: int
    transaction_id: str


@dataclass
class _Refund:
    refund_id: str
    out_refund_no: str
    out_trade_no: str
    transaction_id: str
    refund: int
    total: int
    notify_url: str | None
    created_at: float
    status: str = STATUS_PROCESSING
    success_at: float | None = None


@dataclass(frozen=True)
class NotificationAttempt:
    notification_id: str
    event_type: str
    out_refund_no: str
    url: str
    status: int | None  # None: no HTTP answer (refused, timed out)


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    notification_id: str = field(compare=False)
    event_type: str = field(compare=False)
    out_refund_no: str = field(compare=False)
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    attempt: int = field(compare=False, default=0)
    duplicate: bool = field(compare=False, default=False)


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=BEIJING).isoformat(timespec="seconds")


def _nonce(length: int = 32) -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(length))


def _is_loopback_or_https(url: str) -> bool:
    parts = urlsplit(url)
    if parts.query:
        return False
    return (parts.scheme == "https" and bool(parts.hostname)) or (parts.scheme == "http" and parts.hostname in _LOOPBACK)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 refuses a burst of new connections (16 worker
    # threads opening theirs at once) with connect timeouts the real gateway never shows.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is business as usual here, not a traceback on stderr.
        _log.opt(exception=True).debug("connection from {} ended with an error", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real gateway
    # Headers and body go out in two writes; with Nagle on, the second waits
    # for the client's delayed ACK and every answer takes 40 ms longer.
    disable_nagle_algorithm = True
    server_version = "WeChatPayEmulator"
    sys_version = ""
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one loguru event per request instead (Emulator._exchange)

    def _serve(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.server.emulator._exchange(self, method, None)
            return
        body = self.rfile.read(length) if length else b""
        self.server.emulator._exchange(self, method, body)

    def write_reply(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Emulator:
    """The emulated gateway. Attributes without a leading underscore may be read or set at any time."""

    def __init__(
        self,
        keys: KeyMaterial,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        success_delay: float = SUCCESS_DELAY_SECONDS,
        clock: Callable[[], float] = time.time,
        wire_clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        apply_qps: int | None = APPLY_QPS,
        query_qps: int | None = QUERY_QPS,
        faults: FaultPlan | None = None,
        notify_url: str | None = None,
        strict_payments: bool = False,
        min_refund_interval: float | None = None,
        max_clock_skew: float = MAX_CLOCK_SKEW_SECONDS,
        notify_retry_delays: tuple[float, ...] = NOTIFY_RETRY_DELAYS_SECONDS,
    ) -> None:
        self.keys = keys
        self.host, self.port = host, port
        self.success_delay = success_delay
        self.apply_qps, self.query_qps = apply_qps, query_qps
        self.notify_url = notify_url
        self.strict_payments = strict_payments
        self.min_refund_interval = min_refund_interval
        self.max_clock_skew = max_clock_skew
        self.notify_retry_delays = tuple(notify_retry_delays)
        self.send_bad_signature_notifications = False
        # WeChat sometimes delivers a notification twice; with this on, every
        # delivered notification is sent once more with the same id.
        self.duplicate_notifications = False

        self._clock = clock
        self._wire_clock = wire_clock or clock
        self._monotonic = monotonic
        self._merchant_key = serialization.load_pem_public_key(keys.merchant_public_key_pem.encode("ascii"))
        self._platform_key = _load_private_key(keys.platform_private_key_pem)
        self._aes = AESGCM(keys.apiv3_key.encode("utf-8"))

        # One lock for all state; the condition wakes wait_for(), the ticker and the sender.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._faults = faults
        self._rng = random.Random(faults.seed if faults else None)
        self._targeted: dict[str, list[_Fault]] = {}
        self._not_enough_until: float | None = None
        self._payments: dict[str, _Payment] = {}
        self._payments_by_transaction: dict[str, _Payment] = {}
        self._refunds: dict[str, _Refund] = {}
        self._refunds_by_order: dict[str, list[_Refund]] = {}
        self._processing: set[str] = set()
        self._pinned: set[str] = set()  # forced statuses: the status machine leaves them alone
        self._close_rules: list[Matcher] = []
        self._abnormal_rules: list[Matcher] = []
        self._windows: dict[str, deque[float]] = {"apply": deque(), "query": deque()}
        self._in_flight: Counter[str] = Counter()
        self._deliveries: list[_Delivery] = []
        self._seq = itertools.count()

        # Counters for tests: the proof that no money moved twice.
        self.refunds_created: Counter[str] = Counter()  # out_refund_no -> refunds created (must stay <= 1)
        self.fen_refunded: Counter[str] = Counter()  # out_trade_no -> fen in refunds that are not CLOSED
        self.max_in_flight: dict[str, int] = {}  # out_refund_no -> most requests for it at once
        self.requests: Counter[tuple[str, int]] = Counter()  # (method, status); status 0 = dropped
        self.request_log: deque[tuple[float, str, str, int]] = deque(maxlen=REQUEST_LOG_SIZE)
        self.notifications: list[NotificationAttempt] = []
        self.last_request_id: str | None = None

        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Emulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator-http", daemon=True),
            threading.Thread(target=self._tick_loop, name="emulator-ticker", daemon=True),
            threading.Thread(target=self._send_loop, name="emulator-notify", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        _log.bind(base_url=self.base_url).debug("emulator listening")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        server.shutdown()
        server.server_close()
        # Keep-alive connections would otherwise hold handler threads until the client hangs up.
        with server.sockets_lock:
            lingering = list(server.open_sockets)
        for sock in lingering:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------

    @property
    def faults(self) -> FaultPlan | None:
        return self._faults

    @faults.setter
    def faults(self, plan: FaultPlan | None) -> None:
        with self._lock:
            self._faults = plan
            self._rng = random.Random(plan.seed if plan else None)

    def fail_next(
        self,
        out_refund_no: str,
        kind: str,
        times: int = 1,
        *,
        after_commit: bool = False,
        call: str = "apply",
        slow_seconds: float | None = None,
        **options: Any,
    ) -> None:
        """Make the next `times` calls (`call`: apply, query or any) for this number fail with `kind`.

        `options` are the kind's own (gateway.faults): redirect_status, redirect_to,
        trickle_gap, trickle_bytes, huge_bytes, huge_status, huge_chunked.
        """
        if slow_seconds is None:
            slow_seconds = self._faults.slow_seconds if self._faults else DEFAULT_SLOW_SECONDS
        fault = Fault(kind, after_commit, slow_seconds, call=call, times=times, **options)
        with self._lock:
            self._targeted.setdefault(out_refund_no, []).append(fault)

    def force_status(self, out_refund_no: str, status: str) -> None:
        """Rewrite a recorded refund's status for good (e.g. CLOSED after SUCCESS), so that later
        answers contradict earlier ones. No notification; time no longer moves it. KeyError if unknown."""
        if status not in _EVENTS and status != STATUS_PROCESSING:
            raise ValueError(f"not a refund status: {status!r}")
        with self._changed:
            refund = self._refunds[out_refund_no]
            self._advance(refund, self._clock())  # what time had done already stays done first
            if (refund.status == STATUS_CLOSED) != (status == STATUS_CLOSED):
                # fen_refunded counts refunds that are not CLOSED, whatever history says.
                sign = -1 if status == STATUS_CLOSED else 1
                self.fen_refunded[refund.out_trade_no] += sign * refund.refund
            refund.status = status
            if status == STATUS_SUCCESS and refund.success_at is None:
                refund.success_at = self._clock()
            self._processing.discard(out_refund_no)
            self._pinned.add(out_refund_no)
            self._changed.notify_all()

    def not_enough_until(self, epoch: float | None) -> None:
        """Answer every new application 403 NOT_ENOUGH until clock() reaches epoch (None ends it)."""
        with self._lock:
            self._not_enough_until = epoch

    def register_payment(self, out_trade_no: str, total: int, transaction_id: str | None = None) -> None:
        with self._lock:
            self._add_payment(out_trade_no, total, transaction_id)

    def close_refunds_for(self, match: Matcher) -> None:
        """Refunds matching (out_trade_no, out_refund_no, transaction_id, or a predicate on the refund JSON) end CLOSED."""
        with self._lock:
            self._close_rules.append(match)

    def abnormal_for(self, match: Matcher) -> None:
        """Matching refunds go ABNORMAL instead of SUCCESS and stay there until resolve_abnormal()."""
        with self._lock:
            self._abnormal_rules.append(match)

    def resolve_abnormal(self, match: Matcher, status: str = STATUS_SUCCESS) -> int:
        """Move matching ABNORMAL refunds to SUCCESS (or CLOSED); returns how many moved."""
        if status not in (STATUS_SUCCESS, STATUS_CLOSED):
            raise ValueError("an ABNORMAL refund resolves to SUCCESS or CLOSED")
        moved = 0
        with self._changed:
            now = self._clock()
            for refund in self._refunds.values():
                if refund.status == STATUS_ABNORMAL and self._matches(match, refund):
                    self._finish(refund, status, now)
                    moved += 1
            self._changed.notify_all()
        return moved

    def clear_rules(self) -> None:
        with self._lock:
            self._close_rules.clear()
            self._abnormal_rules.clear()
            self._targeted.clear()

    def refund_status(self, out_refund_no: str) -> str | None:
        with self._lock:
            refund = self._refunds.get(out_refund_no)
            if refund is None:
                return None
            self._advance(refund, self._clock())
            return refund.status

    def refund_id(self, out_refund_no: str) -> str | None:
        """WeChat's refund_id for the refund recorded under this number, or None."""
        with self._lock:
            refund = self._refunds.get(out_refund_no)
            return refund.refund_id if refund is not None else None

    def in_flight(self, out_refund_no: str) -> int:
        """Requests for this number in progress right now (max_in_flight keeps the most ever)."""
        with self._lock:
            return self._in_flight[out_refund_no]

    def tick(self) -> None:
        """Move every due PROCESSING refund on; the background ticker calls this every TICK_SECONDS."""
        with self._changed:
            now = self._clock()
            moved = False
            for number in list(self._processing):
                moved |= self._advance(self._refunds[number], now)
            if moved:
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds (evaluated under the emulator's lock), at most timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    # -- one HTTP exchange -------------------------------------------------------

    def _exchange(self, handler: _Handler, method: str, body: bytes | None) -> None:
        arrived = self._monotonic()
        raw_path = handler.path
        kind, number = self._route(method, raw_path, body)
        with self._changed:
            if number:
                self._in_flight[number] += 1
                self.max_in_flight[number] = max(self.max_in_flight.get(number, 0), self._in_flight[number])
                self._changed.notify_all()  # wait_for(lambda: in_flight(n) == 1) wakes on arrival
        request_id = uuid.uuid4().hex.upper()
        recorded = False
        try:
            if body is None:
                reply = _error(400, "PARAM_ERROR", "missing or oversized body")
            else:
                reply = self._handle(kind, number, method, raw_path, handler.headers, body)
            if reply.delay and self._stopping.wait(reply.delay):
                reply.drop = True
            # Counted before the answer leaves, so a test that has its answer also sees it counted.
            self._record(method, kind, number, 0 if reply.drop else reply.status, arrived, request_id)
            recorded = True
            if reply.drop:
                handler.drop()
            else:
                self._write(handler, reply, request_id)
        finally:
            with self._changed:
                if number:
                    self._in_flight[number] -= 1
                self._changed.notify_all()
            if not recorded:
                self._record(method, kind, number, 0, arrived, request_id)

    def _write(self, handler: _Handler, reply: _Reply, request_id: str) -> None:
        if 300 <= reply.status < 400:
            # As a proxy would send it: no body, no signature.
            base = reply.redirect_to or f"http://127.0.0.2:{handler.server.server_address[1]}"
            handler.write_reply(reply.status, b"", {"Location": base + handler.path, "Request-ID": request_id})
            return
        payload = json.dumps(reply.payload or {}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if reply.huge is not None:
            length, pieces = faults.padded(payload, reply.huge.size)
            # Only a 2xx is signed (over the whole stream); a huge error is a proxy's page.
            if 200 <= reply.status < 300:
                headers = self._signed_headers(pieces(), request_id)
            else:
                headers = {"Content-Type": "application/json", "Request-ID": request_id}
            faults.write_streamed(handler, reply.status, headers, length, pieces(), reply.huge.chunked)
            return
        headers = self._signed_headers([payload], request_id, reply.tamper)

        def write() -> None:
            handler.write_reply(reply.status, payload, headers)

        if reply.trickle is not None:
            faults.write_trickled(handler, reply.trickle, self._stopping, write)
        else:
            write()

    def _record(self, method: str, kind: str, number: str | None, status: int, arrived: float, request_id: str) -> None:
        with self._changed:
            self.requests[(method, status)] += 1
            self.request_log.append((arrived, method, kind, status))
            self.last_request_id = request_id
            self._changed.notify_all()
        _log.bind(method=method, call=kind, out_refund_no=number, status=status, request_id=request_id).debug(
            "emulator answered"
        )

    @staticmethod
    def _route(method: str, raw_path: str, body: bytes | None) -> tuple[str, str | None]:
        path = raw_path.split("?", 1)[0]
        if method == "POST" and path == REFUNDS_PATH:
            try:
                number = json.loads(body or b"").get("out_refund_no")
            except (ValueError, AttributeError):
                number = None
            return "apply", number if isinstance(number, str) else None
        if method == "GET" and path.startswith(REFUNDS_PATH + "/"):
            return "query", path[len(REFUNDS_PATH) + 1 :] or None
        return "other", None

    def _handle(
        self, kind: str, number: str | None, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> _Reply:
        if kind == "other":
            return _error(404, "NOT_FOUND", "no such API in the emulator")
        refused = self._authenticate(method, raw_path, headers, body)
        if refused is not None:
            return refused
        if self._over_limit(kind):
            return _error(*ERRORS["429"])
        fault = self._draw_fault(kind, number)
        if fault is not None and not fault.after_commit:
            # A forged answer only makes sense for an application: a query records nothing to forge.
            forge = (lambda: self._forged_refund(body)) if kind == "apply" else (lambda: None)
            early = faults.strike_before(fault, forge, self._stopping)
            if early is not None:
                return early
        if kind == "apply":
            reply = self._apply(body)
        else:
            reply = self._query(number or "")
        # A query records nothing, so a bad signature on it can only tamper the real answer.
        strike_after = fault is not None and (
            fault.after_commit or (kind == "query" and fault.kind == "bad_signature")
        )
        if strike_after and reply.status == 200:
            return faults.strike_after(fault, reply)
        return reply

    # -- authentication and signing -----------------------------------------------

    def _authenticate(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> _Reply | None:
        scheme, _, params = (headers.get("Authorization") or "").partition(" ")
        if scheme != AUTH_SCHEME:
            return _error(401, "SIGN_ERROR", "missing Authorization or unsupported scheme")
        fields = dict(_AUTH_FIELD.findall(params))
        if not {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} <= fields.keys():
            return _error(401, "SIGN_ERROR", "Authorization lacks a field")
        if fields["mchid"] != self.keys.mchid:
            return _error(404, "MCH_NOT_EXISTS", "merchant does not exist")
        if fields["serial_no"].upper() != self.keys.merchant_serial_no:
            return _error(401, "SIGN_ERROR", "unknown merchant certificate serial_no")
        try:
            timestamp = int(fields["timestamp"])
        except ValueError:
            return _error(401, "SIGN_ERROR", "timestamp is not a number")
        if abs(self._wire_clock() - timestamp) > self.max_clock_skew:
            return _error(401, "SIGN_ERROR", "timestamp is too far from the gateway's clock")
        try:
            message = f"{method}\n{raw_path}\n{fields['timestamp']}\n{fields['nonce_str']}\n{body.decode('utf-8')}\n"
            self._merchant_key.verify(
                b64decode(fields["signature"], validate=True), message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, ValueError):
            return _error(401, "SIGN_ERROR", "signature verification failed")
        return None

    def _sign(self, text: str) -> str:
        signature = self._platform_key.sign(text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        return b64encode(signature).decode("ascii")

    def _signed_headers(self, body: Iterable[bytes], request_id: str, tamper: bool = False) -> dict[str, str]:
        """Headers signing `body`, given piece by piece (a huge body is never held whole)."""
        timestamp, nonce = str(int(self._wire_clock())), _nonce()
        digest = hashes.Hash(hashes.SHA256())
        digest.update(f"{timestamp}\n{nonce}\n".encode("ascii"))
        for piece in body:
            digest.update(piece)
        # A well-formed signature over other bytes: only verification can tell.
        digest.update(b"\ntampered" if tamper else b"\n")
        signed = self._platform_key.sign(digest.finalize(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        signature = b64encode(signed).decode("ascii")
        return {
            "Content-Type": "application/json",
            "Request-ID": request_id,
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": signature,
            "Wechatpay-Serial": self.keys.platform_public_key_id,
            "Wechatpay-Signature-Type": AUTH_SCHEME,
        }

    # -- limits and faults ---------------------------------------------------------

    def _over_limit(self, kind: str) -> bool:
        with self._lock:
            limit = self.apply_qps if kind == "apply" else self.query_qps
            if limit is None:
                return False
            now = self._monotonic()
            window = self._windows[kind]
            while window and window[0] <= now - QPS_WINDOW_SECONDS:
                window.popleft()
            if len(window) >= limit:
                return True
            window.append(now)
            return False

    def _draw_fault(self, kind: str, number: str | None) -> Fault | None:
        with self._lock:
            for fault in self._targeted.get(number or "", []):
                if fault.call in (kind, "any"):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._targeted[number or ""].remove(fault)
                    return fault
            return self._faults.draw(self._rng) if self._faults is not None else None

    def _forged_refund(self, body: bytes) -> dict[str, Any] | None:
        """A refund object echoing the request that was never recorded; None if the request is malformed."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if _invalid_apply_fields(data) is not None:
            return None
        forged = _Refund(
            refund_id=_digits("50", 32),
            out_refund_no=data["out_refund_no"],
            out_trade_no=str(data.get("out_trade_no") or ""),
            transaction_id=str(data.get("transaction_id") or ""),
            refund=data["amount"]["refund"],
            total=data["amount"]["total"],
            notify_url=None,
            created_at=self._clock(),
        )
        return self._refund_json(forged)

    # -- refunds ------------------------------------------------------------------

    def _apply(self, body: bytes) -> _Reply:
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "PARAM_ERROR", "body is not JSON")
        invalid = _invalid_apply_fields(data)
        if invalid:
            return _error(400, "PARAM_ERROR", invalid)
        amount = data["amount"]
        number = data["out_refund_no"]
        with self._changed:
            now = self._clock()
            existing = self._refunds.get(number)
            if existing is not None:
                return self._replay(existing, data, now)
            if self._not_enough_until is not None and now < self._not_enough_until:
                return _error(*ERRORS["not_enough"])
            payment, refused = self._payment_for(data)
            if refused is not None:
                return refused
            assert payment is not None
            if amount["total"] != payment.total:
                return _error(400, "INVALID_REQUEST", "amount.total differs from the amount paid")
            if amount["refund"] > amount["total"]:
                return _error(400, "INVALID_REQUEST", "refund amount exceeds the order total")
            earlier = self._refunds_by_order.get(payment.out_trade_no, [])
            if len(earlier) >= MAX_REFUNDS_PER_ORDER:
                return _error(429, "FREQUENCY_LIMITED", "too many refunds on this order")
            if self.min_refund_interval and earlier and now - earlier[-1].created_at < self.min_refund_interval:
                return _error(429, "FREQUENCY_LIMITED", "refunds on one order must be a minute apart")
            if amount["refund"] > payment.total - self.fen_refunded[payment.out_trade_no]:
                return _error(400, "INVALID_REQUEST", "refund amount exceeds what is left to refund on the order")
            refund = _Refund(
                refund_id=_digits("50", 32),
                out_refund_no=number,
                out_trade_no=payment.out_trade_no,
                transaction_id=payment.transaction_id,
                refund=amount["refund"],
                total=amount["total"],
                notify_url=data.get("notify_url") or None,
                created_at=now,
            )
            self._refunds[number] = refund
            self._refunds_by_order.setdefault(payment.out_trade_no, []).append(refund)
            self._processing.add(number)
            self.refunds_created[number] += 1
            self.fen_refunded[payment.out_trade_no] += refund.refund
            self._changed.notify_all()
            return _Reply(200, self._refund_json(refund))

    def _replay(self, existing: _Refund, data: dict[str, Any], now: float) -> _Reply:
        amount = data["amount"]
        same_order = data.get("out_trade_no") == existing.out_trade_no or (
            bool(data.get("transaction_id")) and data.get("transaction_id") == existing.transaction_id
        )
        if not same_order or amount["refund"] != existing.refund or amount["total"] != existing.total:
            return _error(400, "INVALID_REQUEST", "out_refund_no was already used for a different refund")
        self._advance(existing, now)
        return _Reply(200, self._refund_json(existing))

    def _payment_for(self, data: dict[str, Any]) -> tuple[_Payment | None, _Reply | None]:
        out_trade_no, transaction_id = data.get("out_trade_no"), data.get("transaction_id")
        payment = self._payments_by_transaction.get(transaction_id) if transaction_id else self._payments.get(out_trade_no)
        if payment is not None:
            return payment, None
        if self.strict_payments:
            return None, _error(404, "RESOURCE_NOT_EXISTS", "order does not exist")
        # Lenient default: the first refund of an unknown order says what was paid.
        return self._add_payment(out_trade_no or transaction_id, data["amount"]["total"], transaction_id), None

    def _add_payment(self, out_trade_no: str, total: int, transaction_id: str | None) -> _Payment:
        payment = _Payment(out_trade_no, total, transaction_id or _digits("4200", 28))
        self._payments[out_trade_no] = payment
        self._payments_by_transaction[payment.transaction_id] = payment
        return payment

    def _query(self, number: str) -> _Reply:
        if not _OUT_REFUND_NO.match(number):
            return _error(400, "PARAM_ERROR", "out_refund_no is malformed")
        with self._changed:
            refund = self._refunds.get(number)
            if refund is None:
                return _error(404, "RESOURCE_NOT_EXISTS", "refund does not exist")
            if self._advance(refund, self._clock()):
                self._changed.notify_all()
            return _Reply(200, self._refund_json(refund))

    def _advance(self, refund: _Refund, now: float) -> bool:
        """Lazily apply the status machine; True if the refund moved. Caller holds the lock."""
        if refund.status != STATUS_PROCESSING or now < refund.created_at + self.success_delay:
            return False
        if refund.out_refund_no in self._pinned:
            return False
        due = refund.created_at + self.success_delay
        if any(self._matches(rule, refund) for rule in self._close_rules):
            self._finish(refund, STATUS_CLOSED, due)
        elif any(self._matches(rule, refund) for rule in self._abnormal_rules):
            self._finish(refund, STATUS_ABNORMAL, due)
        else:
            self._finish(refund, STATUS_SUCCESS, due)
        return True

    def _finish(self, refund: _Refund, status: str, at: float) -> None:
        refund.status = status
        self._processing.discard(refund.out_refund_no)
        if status == STATUS_SUCCESS:
            refund.success_at = at
        elif status == STATUS_CLOSED:
            self.fen_refunded[refund.out_trade_no] -= refund.refund  # a closed refund moved no money
        self._queue_notification(refund)

    def _matches(self, rule: Matcher, refund: _Refund) -> bool:
        if callable(rule):
            return bool(rule(self._refund_json(refund)))
        return rule in (refund.out_trade_no, refund.out_refund_no, refund.transaction_id)

    def _refund_json(self, refund: _Refund) -> dict[str, Any]:
        data: dict[str, Any] = {
            "refund_id": refund.refund_id,
            "out_refund_no": refund.out_refund_no,
            "transaction_id": refund.transaction_id,
            "out_trade_no": refund.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": USER_RECEIVED_ACCOUNT,
            "create_time": _rfc3339(refund.created_at),
            "status": refund.status,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": refund.total,
                "refund": refund.refund,
                "payer_total": refund.total,
                "payer_refund": refund.refund,
                "settlement_total": refund.total,
                "settlement_refund": refund.refund,
                "discount_refund": 0,
                "currency": "CNY",
                "from": [],
            },
        }
        if refund.status == STATUS_SUCCESS and refund.success_at is not None:
            data["success_time"] = _rfc3339(refund.success_at)
        return data

    # -- notifications ----------------------------------------------------------

    def _queue_notification(self, refund: _Refund) -> None:
        url = refund.notify_url or self.notify_url
        if not url or refund.status not in _EVENTS:
            return
        event_type, summary = _EVENTS[refund.status]
        resource: dict[str, Any] = {
            "mchid": self.keys.mchid,
            "out_trade_no": refund.out_trade_no,
            "transaction_id": refund.transaction_id,
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "refund_status": refund.status,
            "user_received_account": USER_RECEIVED_ACCOUNT,
            "amount": {
                "total": refund.total,
                "refund": refund.refund,
                "payer_total": refund.total,
                "payer_refund": refund.refund,
            },
        }
        if refund.success_at is not None and refund.status == STATUS_SUCCESS:
            resource["success_time"] = _rfc3339(refund.success_at)
        nonce = _nonce(12)  # the SDK feeds the nonce's UTF-8 bytes to AES-GCM: 12 characters = 96 bits
        ciphertext = self._aes.encrypt(
            nonce.encode("ascii"), json.dumps(resource, ensure_ascii=False).encode("utf-8"), b"refund"
        )
        notification_id = str(uuid.uuid4())
        envelope = {
            "id": notification_id,
            "create_time": _rfc3339(self._clock()),
            "event_type": event_type,
            "resource_type": "encrypt-resource",
            "summary": summary,
            "resource": {
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": b64encode(ciphertext).decode("ascii"),
                "associated_data": "refund",
                "original_type": "refund",
                "nonce": nonce,
            },
        }
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        heapq.heappush(
            self._deliveries,
            _Delivery(time.monotonic(), next(self._seq), notification_id, event_type, refund.out_refund_no, url, body),
        )
        self._changed.notify_all()

    def _tick_loop(self) -> None:
        while not self._stopping.wait(TICK_SECONDS):
            self.tick()

    def _send_loop(self) -> None:
        with requests.Session() as session:
            while True:
                with self._changed:
                    while not self._stopping.is_set():
                        if self._deliveries and self._deliveries[0].due <= time.monotonic():
                            break
                        wait = self._deliveries[0].due - time.monotonic() if self._deliveries else TICK_SECONDS * 4
                        self._changed.wait(max(wait, 0.001))
                    if self._stopping.is_set():
                        return
                    delivery = heapq.heappop(self._deliveries)
                self._deliver(session, delivery)

    def _deliver(self, session: requests.Session, delivery: _Delivery) -> None:
        timestamp, nonce = str(int(self._wire_clock())), _nonce()
        signed = f"{timestamp}\n{nonce}\n{delivery.body.decode('utf-8')}\n"
        bad = self.send_bad_signature_notifications
        headers = {
            "Content-Type": "application/json",
            "Request-ID": uuid.uuid4().hex.upper(),
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": self._sign(signed + "tampered" if bad else signed),
            "Wechatpay-Serial": self.keys.platform_public_key_id,
            "Wechatpay-Signature-Type": AUTH_SCHEME,
        }
        status: int | None
        try:
            status = session.post(delivery.url, data=delivery.body, headers=headers, timeout=NOTIFY_TIMEOUT_SECONDS).status_code
        except requests.RequestException:
            status = None
        with self._changed:
            self.notifications.append(
                NotificationAttempt(delivery.notification_id, delivery.event_type, delivery.out_refund_no, delivery.url, status)
            )
            delivered = status is not None and 200 <= status < 300
            if not delivered and delivery.attempt < len(self.notify_retry_delays):
                delivery.due = time.monotonic() + self.notify_retry_delays[delivery.attempt]
                delivery.attempt += 1
                heapq.heappush(self._deliveries, delivery)
            elif delivered and self.duplicate_notifications and not delivery.duplicate:
                delivery.duplicate = True
                delivery.due = time.monotonic()
                heapq.heappush(self._deliveries, delivery)
            self._changed.notify_all()
        _log.bind(
            notification_id=delivery.notification_id,
            event_type=delivery.event_type,
            out_refund_no=delivery.out_refund_no,
            status=status,
            attempt=delivery.attempt,
        ).debug("emulator sent a notification")


@functools.lru_cache(maxsize=8)
def _load_private_key(pem: str) -> Any:
    # Loading validates the RSA key (~50 ms); tests start an emulator per test with the same keys.
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def _digits(prefix: str, length: int) -> str:
    return prefix + "".join(secrets.choice(string.digits) for _ in range(length - len(prefix)))


def _invalid_apply_fields(data: Any) -> str | None:
    """The PARAM_ERROR message for a malformed application, or None."""
    if not isinstance(data, dict):
        return "body must be a JSON object"
    number = data.get("out_refund_no")
    if not isinstance(number, str) or not _OUT_REFUND_NO.match(number):
        return "out_refund_no is missing or malformed"
    out_trade_no, transaction_id = data.get("out_trade_no"), data.get("transaction_id")
    if not out_trade_no and not transaction_id:
        return "out_trade_no or transaction_id is required"
    for value in (out_trade_no, transaction_id):
        if value is not None and (not isinstance(value, str) or len(value) > 32):
            return "out_trade_no and transaction_id are strings of at most 32 characters"
    amount = data.get("amount")
    if not isinstance(amount, dict):
        return "amount is required"
    for key in ("refund", "total"):
        value = amount.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"amount.{key} must be a positive integer (fen)"
    if amount.get("currency") != "CNY":
        return "amount.currency must be CNY"
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason.encode("utf-8")) > 80):
        return "reason is at most 80 bytes"
    notify_url = data.get("notify_url")
    if notify_url is not None and (not isinstance(notify_url, str) or not _is_loopback_or_https(notify_url)):
        return "notify_url must be an https URL without a query"
    return None


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    key_dir: Path | None = None,
    success_delay: float = SUCCESS_DELAY_SECONDS,
    apply_qps: int | None = APPLY_QPS,
    query_qps: int | None = QUERY_QPS,
    faults: FaultPlan | None = None,
) -> int:
    """The `cancel-scanner emulator` command: serve until SIGTERM/SIGINT, then stop cleanly and return 0.

    Prints one line per fact a client needs; key files are named, never shown.
    Must run on the main thread (signal handlers).
    """
    directory = Path(key_dir) if key_dir is not None else Path(tempfile.mkdtemp(prefix="cancel-scanner-emulator-"))
    keys = generate_key_material(directory)
    assert keys.paths is not None
    emulator = Emulator(
        keys, host=host, port=port, success_delay=success_delay, apply_qps=apply_qps, query_qps=query_qps, faults=faults
    )
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


if __name__ == "__main__":
    sys.exit(serve())
