"""One HTTP exchange with the emulator: route, delay, authenticate, rate-limit, fault hooks, process, answer, count.

A mixin of gateway.emulator.Emulator. It keeps the request counters tests read
(`requests`, `request_log`, `max_in_flight`, `faults_injected`, `last_request_id`),
the QPS windows and the optional network `latency`; the refund work itself is the
ledger's (`_apply`, `_query`), and faults come only from the emulator's `faults`
hooks (gateway.emulator.hooks; none by default).
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable

from loguru import logger

from cancel_scanner.gateway.emulator.bills import BILL_CALLS, BILL_PATH, DOWNLOAD_PATH
from cancel_scanner.gateway.emulator.hooks import ApiCall, FaultHooks, Strike
from cancel_scanner.gateway.emulator.replies import ERRORS, FileReply, Reply, write_paced, write_streamed
from cancel_scanner.gateway.emulator.replies import error_reply as _error
from cancel_scanner.gateway.emulator.server import Handler
from cancel_scanner.gateway.emulator.signing import RequestHeaders, Signer

REFUNDS_PATH = "/v3/refund/domestic/refunds"
ABNORMAL_REFUND_SUFFIX = "/apply-abnormal-refund"  # POST REFUNDS_PATH/{refund_id}/apply-abnormal-refund
TRADES_PATH = "/v3/pay/transactions/out-trade-no"
APPLY_QPS = 150
QUERY_QPS = 300
PAYMENT_QPS = 300  # each of the payment query and the close
QPS_WINDOW_SECONDS = 1.0
REQUEST_LOG_SIZE = 100_000
LATENCY_SEED = 7  # the same run of delays every time: a scenario's timing does not depend on luck

_log = logger.bind(component="emulator")


class RequestHandling:
    # Provided by the Emulator:
    max_clock_skew: float
    _lock: threading.RLock
    _changed: threading.Condition
    _stopping: threading.Event
    _clock: Callable[[], float]
    _monotonic: Callable[[], float]
    _signer: Signer
    faults: FaultHooks
    _apply: Callable[[bytes], Reply]
    _query: Callable[[str], Reply]
    _query_payment: Callable[[str], Reply]
    _close_payment: Callable[[str], Reply]
    _answer_bill: Callable[[str, str], Reply]
    _apply_abnormal: Callable[[str, RequestHeaders, bytes], Reply]

    def _init_requests(
        self, apply_qps: int | None, query_qps: int | None, latency: tuple[float, float] | None, request_log_size: int
    ) -> None:
        self.apply_qps, self.query_qps = apply_qps, query_qps
        # (low, high): every refund call waits a uniform draw from it before it is handled (the
        # network and WeChat's own work), so a client's calls overlap; None: answered at once.
        self.latency = latency
        self._latency_rng = random.Random(LATENCY_SEED)
        self.payment_qps: int | None = PAYMENT_QPS
        self._windows: dict[str, deque[float]] = {k: deque() for k in ("apply", "query", "pay_query", "pay_close")}
        self._windows["abnormal"] = deque()  # apply-abnormal-refund: paced as payment_qps (WeChat publishes no figure)
        self._in_flight: Counter[str] = Counter()
        self.max_in_flight: dict[str, int] = {}  # out_refund_no -> most requests for it at once
        self.requests: Counter[tuple[str, int]] = Counter()  # (method, status); status 0 = dropped
        self.faults_injected: Counter[str] = Counter()  # Strike.label ("500/after", "slow/before") -> times struck
        # (arrived on `monotonic`, method, call, status), the newest request_log_size of them
        self.request_log: deque[tuple[float, str, str, int]] = deque(maxlen=request_log_size)
        self.last_request_id: str | None = None

    def in_flight(self, out_refund_no: str) -> int:
        """Requests for this number in progress right now (max_in_flight keeps the most ever)."""
        with self._lock:
            return self._in_flight[out_refund_no]

    def logged_requests(self) -> list[tuple[float, str, str, int]]:
        """A copy of `request_log`, taken under the lock so no request lands halfway through it."""
        with self._lock:
            return list(self.request_log)

    def forget_requests(self) -> None:
        """Empty `request_log` and `requests`, so a measurement counts only the calls made after it."""
        with self._lock:
            self.request_log.clear()
            self.requests.clear()

    def _exchange(self, handler: Handler, method: str, body: bytes | None) -> None:
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

    def _write(self, handler: Handler, reply: Reply, request_id: str) -> None:
        if isinstance(reply, FileReply):
            reply.write(handler, request_id, self._stopping)  # a bill download: bytes, and unsigned
            return
        if 300 <= reply.status < 400:
            # As a proxy would send it: no body, no signature.
            base = reply.redirect_to or f"http://127.0.0.2:{handler.server.server_address[1]}"
            handler.write_reply(reply.status, b"", {"Location": base + handler.path, "Request-ID": request_id})
            return
        if reply.stream is not None:
            # A JSON answer's stream is signed over all of it, or goes out unsigned as a proxy's page would.
            stream = reply.stream
            if stream.signed:
                headers = self._signer.signed_headers(stream.pieces(), request_id)
            else:
                headers = {"Content-Type": "application/json", "Request-ID": request_id}
            write_streamed(handler, reply.status, headers, stream)
            return
        payload = reply.encoded()
        headers = self._signer.signed_headers([payload], request_id, reply.tamper)

        def write() -> None:
            handler.write_reply(reply.status, payload, headers)

        if reply.pace is not None:
            write_paced(handler, reply.pace, self._stopping, write)
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
        if method == "POST" and path.startswith(REFUNDS_PATH + "/") and path.endswith(ABNORMAL_REFUND_SUFFIX):
            # Counted and aimed at by the out_refund_no in the body, as an application is: the refund's number.
            try:
                number = json.loads(body or b"").get("out_refund_no")
            except (ValueError, AttributeError):
                number = None
            return "abnormal", number if isinstance(number, str) else None
        if method == "GET" and path.startswith(REFUNDS_PATH + "/"):
            return "query", path[len(REFUNDS_PATH) + 1 :] or None
        if method == "GET" and path in (BILL_PATH, DOWNLOAD_PATH):
            return ("trade_bill" if path == BILL_PATH else "bill_download"), None
        if path.startswith(TRADES_PATH + "/"):
            rest = path[len(TRADES_PATH) + 1 :]
            if method == "GET" and rest and "/" not in rest:
                return "pay_query", rest
            if method == "POST" and rest.endswith("/close") and rest.count("/") == 1:
                return "pay_close", rest[: -len("/close")]
        return "other", None

    def _handle(
        self, kind: str, number: str | None, method: str, raw_path: str, headers: RequestHeaders, body: bytes
    ) -> Reply:
        if kind == "other":
            return _error(404, "NOT_FOUND", "no such API in the emulator")
        if self._wait_latency():
            return Reply(drop=True)  # stopping: the connection goes with the server
        refused = self._signer.authenticate(method, raw_path, headers, body, self.max_clock_skew)
        if refused is not None:
            return refused
        if kind in BILL_CALLS:
            return self._answer_bill(kind, raw_path)  # gateway.emulator.bills: no QPS window, fault hook of its own
        if self._over_limit(kind):
            return _error(*ERRORS["429"])
        strike = self._draw_fault(kind, number)
        if strike is None:
            return self._process(kind, number, raw_path, headers, body)
        call = ApiCall(kind, number, body, self._clock, self._stopping)
        early = strike.before(call)
        return early if early is not None else strike.after(call, self._process(kind, number, raw_path, headers, body))

    def _process(self, kind: str, number: str | None, raw_path: str, headers: RequestHeaders, body: bytes) -> Reply:
        if kind == "apply":
            return self._apply(body)
        if kind == "query":
            return self._query(number or "")
        if kind == "abnormal":
            path = raw_path.split("?", 1)[0]
            return self._apply_abnormal(path[len(REFUNDS_PATH) + 1 : -len(ABNORMAL_REFUND_SUFFIX)], headers, body)
        if kind == "pay_query":
            return self._query_payment(number or "")
        return self._close_payment(number or "")

    def _over_limit(self, kind: str) -> bool:
        """True if this call is over its QPS limit; a call that is not does count towards the window."""
        with self._lock:
            limit = {"apply": self.apply_qps, "query": self.query_qps}.get(kind, self.payment_qps)
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

    def _wait_latency(self) -> bool:
        """Wait this call's draw from `latency` (if set); True if the emulator began stopping meanwhile."""
        with self._lock:
            if self.latency is None:
                return False
            delay = self._latency_rng.uniform(*self.latency)
        return self._stopping.wait(delay)

    def _draw_fault(self, kind: str, number: str | None) -> Strike | None:
        with self._lock:
            strike = self.faults.draw(kind, number)
            if strike is not None:
                self.faults_injected[strike.label] += 1
            return strike
