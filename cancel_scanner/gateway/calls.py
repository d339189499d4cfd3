"""One call's plumbing below WeChatPayGateway: its budget, the SDK transport stand-in, its log record.

Transport decision (connection reuse and the Request-ID header). The sync
SDK calls the module-level `requests.get/post` from `wechatpayv3.core` and
returns only `(status, body)`. That costs a new TCP+TLS handshake per call
(tens of milliseconds to api.mch.weixin.qq.com, often more than the call
itself) and drops the `Request-ID` header that WeChat support asks for. There
is no per-instance hook, so we replace the module attribute
`wechatpayv3.core.requests` once with `_SdkTransport`, a stand-in that
behaves exactly like `requests` except while a gateway call is in progress on
the current thread: then it sends through that gateway's per-thread
`requests.Session` (keep-alive; sessions are not thread-safe, hence per
thread) and records the status and Request-ID. Anything else using the SDK in
this process is unaffected. We judged this clean enough because it is one
small, idempotent, version-pinned substitution that keeps the SDK's signing
and verification untouched; `reuse_connections=False` keeps the capture but
opens a new connection per call, as the SDK does. The same stand-in refuses a
2xx signed under a serial other than our platform public key id: the SDK would
otherwise try to download platform certificates (GET /v3/certificates) in
the middle of a refund and fail in odd ways.

Bounds (gateway.transport does the HTTP side). A call may carry a
`deadline`: a callable returning the time.monotonic() instant by which the
whole call must be over, e.g. the end of the caller's lease on the row. The
stand-in books a pacing slot only if the call can still finish after it
(`min_call_seconds`), looks at the deadline again once the slot has come and
the SDK has signed, and gives up before a single byte leaves (NotSent) if
too little time is left; the answer must then be complete by
min(now + connect + read timeouts, deadline), or the call is a TIMEOUT. Every
answer is read within MAX_ANSWER_BYTES, and no redirect is ever followed: a
redirect is an unknown outcome like any answer we cannot read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
import wechatpayv3.core as sdk_core
from loguru import logger

from cancel_scanner.gateway.classify import CallNotSent, UnverifiedResponse
from cancel_scanner.gateway.contract import GatewayResult
from cancel_scanner.gateway.ratelimit import RateLimiter
from cancel_scanner.gateway.transport import send_within

MAX_ANSWER_BYTES = 1024 * 1024  # a refund object is ~1 KB; anything near this is not WeChat's answer

_log = logger.bind(component="gateway")


@dataclass
class Capture:
    status: int | None = None
    request_id: str | None = None

    # The answer's signature headers, for an answer the SDK does not verify (an error) but we must.
    signature: dict[str, str] | None = None

    def record(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.request_id = response.headers.get("Request-ID")
        self.signature = {
            "-".join(part.capitalize() for part in name.split("-")): value
            for name, value in response.headers.items()
            if name.lower().startswith("wechatpay-")
        }


@dataclass(frozen=True)
class Budget:
    """When one call may leave, and by when it must be over."""

    timeout: tuple[float, float]
    min_call_seconds: float
    limiter: RateLimiter | None = None
    deadline: Callable[[], float] | None = None
    # The call's own bound instead of connect + read: a bill download streams for longer than one answer.
    longest: float | None = None

    def check_time_left(self, now: float) -> float | None:
        """The caller's deadline, or None without one; CallNotSent if the call could no longer finish."""
        if self.deadline is None:
            return None
        deadline = self.deadline()
        if deadline - now < self.min_call_seconds:
            raise CallNotSent("DEADLINE", f"less than {self.min_call_seconds:g} s left before the caller's deadline")
        return deadline

    def take_slot(self) -> None:
        """Wait for a pacing slot; with a deadline, book one only if the call can still finish after it."""
        if self.limiter is None:
            return
        if self.deadline is None:
            self.limiter.acquire()
        elif self.limiter.try_acquire(self.deadline() - self.min_call_seconds) is None:
            raise CallNotSent("DEADLINE", "no pacing slot early enough to finish before the caller's deadline")

    def end_of_call(self) -> float:
        """Right before sending: the instant the complete answer must be in by."""
        now = time.monotonic()
        own = now + (sum(self.timeout) if self.longest is None else self.longest)
        deadline = self.check_time_left(now)
        return own if deadline is None else min(own, deadline)


@dataclass
class Binding:
    session: requests.Session
    expected_serial: str
    budget: Budget
    capture: Capture = field(default_factory=Capture)
    max_bytes: int = MAX_ANSWER_BYTES
    signed: bool = True  # False: a bill download, whose answer WeChat does not sign (its SHA1 is checked instead)


class _SdkTransport:
    """Stands in for the `requests` module inside wechatpayv3.core (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def bound(self, binding: Binding) -> Iterator[None]:
        previous = getattr(self._local, "binding", None)
        self._local.binding = binding
        try:
            yield
        finally:
            self._local.binding = previous

    def _send(self, method: str, **kwargs: Any) -> requests.Response:
        binding: Binding | None = getattr(self._local, "binding", None)
        if binding is None:
            return getattr(requests, method)(**kwargs)
        budget = binding.budget
        # Paced here, after the SDK has signed and just before the bytes leave: the
        # closer the slot is to the wire, the less jitter between our pace and WeChat's count.
        budget.take_slot()
        # The deadline again: the pacing wait may have eaten it, or the caller's lease ended meanwhile.
        end = budget.end_of_call()
        kwargs.pop("timeout", None)  # the SDK's copy of ours; send_within cuts it to the deadline
        response = send_within(
            binding.session,
            method,
            deadline=end,
            timeout=budget.timeout,
            max_bytes=binding.max_bytes,
            on_headers=binding.capture.record,
            **kwargs,
        )
        signed_elsewhere = response.headers.get("Wechatpay-Serial") != binding.expected_serial
        if binding.signed and 200 <= response.status_code < 300 and signed_elsewhere:
            raise UnverifiedResponse("2xx answer signed under an unexpected serial")
        return response

    def get(self, **kwargs: Any) -> requests.Response:
        return self._send("get", **kwargs)

    def post(self, **kwargs: Any) -> requests.Response:
        return self._send("post", **kwargs)

    def patch(self, **kwargs: Any) -> requests.Response:
        return self._send("patch", **kwargs)

    def put(self, **kwargs: Any) -> requests.Response:
        return self._send("put", **kwargs)

    def delete(self, **kwargs: Any) -> requests.Response:
        return self._send("delete", **kwargs)


TRANSPORT = _SdkTransport()
_INSTALL_LOCK = threading.Lock()


def install_transport() -> None:
    with _INSTALL_LOCK:
        current = getattr(sdk_core, "requests", None)
        if current is TRANSPORT:
            return
        if current is not requests:
            raise RuntimeError("wechatpayv3.core no longer uses module-level `requests`; re-check the SDK pin")
        sdk_core.requests = TRANSPORT


_LOGGED_AS = {"trade_bill": "bill_date", "download_bill": "path"}  # what a call's `number` is, in its log record


def log_call(action: str, number: str, capture: Capture, started: float, result: GatewayResult) -> None:
    _log.bind(
        action=action,
        **{_LOGGED_AS.get(action) or ("out_trade_no" if action.startswith("pay_") else "out_refund_no"): number},
        http_status=capture.status,
        request_id=capture.request_id,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        outcome=type(result).__name__,
        code=getattr(result, "code", None),
    ).debug("{} answered: {}", action, result.describe())
