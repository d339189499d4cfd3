"""The live RefundGateway: WeChat Pay API v3 refunds through the `wechatpayv3` SDK (pinned to 2.0.4).

The SDK signs requests and verifies 2xx answers; we pace calls, bound them
in time and size, classify every answer into a GatewayResult and keep secrets
out of logs.

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

The daily bill. trade_bill is a call like the others (signed both ways). Its
download goes through the same stand-in with three differences: it goes only
to base_url's own scheme, host and port (the request carries our signature;
any other URL is refused before a byte leaves), its answer is not signed (no
serial check: the SHA1 from the signed apply vouches for the bytes, and
operations.bill checks it), and its cap and time bound are the caller's
(max_bytes on the wire and again after gunzip, which inflates step by step;
max_seconds for the whole download) instead of MAX_ANSWER_BYTES and
connect + read.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import requests
import wechatpayv3.core as sdk_core
from loguru import logger
from wechatpayv3 import WeChatPay, WeChatPayType

from cancel_scanner.engine.clock import MIN_CALL_SECONDS
from cancel_scanner.engine.net import is_safe_gateway_url
from cancel_scanner.gateway.classify import (
    CallNotSent,
    UnverifiedResponse,
    classify,
    classify_exception,
    classify_payment,
    is_sdk_signature_error,
)
from cancel_scanner.gateway.contract import (
    ABNORMAL_REFUND_TYPES,
    ABNORMAL_TO_USER,
    BANK_TYPE_PATTERN,
    BILL_TYPES,
    DEFAULT_BILL_DOWNLOAD_SECONDS,
    DEFAULT_BILL_MAX_BYTES,
    OUT_REFUND_NO_PATTERN,
    OUT_TRADE_NO_PATTERN,
    REFUND_ID_PATTERN,
    STATEMENT_CREATING,
    Accepted,
    BillDownloadFailed,
    BillReady,
    BillResult,
    GatewayResult,
    NotSent,
    PaymentResult,
    PaymentState,
    Permanent,
    RefundRequest,
    RetryLater,
    Secret,
    UnknownOutcome,
)
from cancel_scanner.gateway.ratelimit import RateLimiter
from cancel_scanner.gateway.transport import new_session, send_within

LIVE_BASE_URL = "https://api.mch.weixin.qq.com"
DEFAULT_TIMEOUT_SECONDS = (5.0, 15.0)  # connect, read; the SDK's own default is to wait forever
DEFAULT_APPLY_QPS = 150  # WeChat's per-merchant limits
DEFAULT_QUERY_QPS = 300
APIV3_KEY_BYTES = 32
PACING_HEADROOM = 0.95  # of apply_qps / query_qps; see __init__
MAX_ANSWER_BYTES = 1024 * 1024  # a refund object is ~1 KB; anything near this is not WeChat's answer
ENDPOINTS = ("apply", "query", "pay_query", "pay_close", "abnormal")
# WeChat publishes no figure for these two that we could find; a conservative pace of our own,
# configurable (wechat.pay_query_qps / wechat.pay_close_qps).
DEFAULT_PAY_QUERY_QPS = 100
DEFAULT_PAY_CLOSE_QPS = 50
SIGNATURE_HEADERS = (
    "Wechatpay-Signature",
    "Wechatpay-Timestamp",
    "Wechatpay-Nonce",
    "Wechatpay-Serial",
    "Wechatpay-Signature-Type",
)

_log = logger.bind(component="gateway")


@dataclass
class _Capture:
    status: int | None = None
    request_id: str | None = None

    def record(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.request_id = response.headers.get("Request-ID")


@dataclass(frozen=True)
class _Budget:
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
class _Binding:
    session: requests.Session
    expected_serial: str
    budget: _Budget
    capture: _Capture = field(default_factory=_Capture)
    max_bytes: int = MAX_ANSWER_BYTES
    signed: bool = True  # False: a bill download, whose answer WeChat does not sign (its SHA1 is checked instead)


class _SdkTransport:
    """Stands in for the `requests` module inside wechatpayv3.core (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def bound(self, binding: _Binding) -> Iterator[None]:
        previous = getattr(self._local, "binding", None)
        self._local.binding = binding
        try:
            yield
        finally:
            self._local.binding = previous

    def _send(self, method: str, **kwargs: Any) -> requests.Response:
        binding: _Binding | None = getattr(self._local, "binding", None)
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


_TRANSPORT = _SdkTransport()
_INSTALL_LOCK = threading.Lock()


def _install_transport() -> None:
    with _INSTALL_LOCK:
        current = getattr(sdk_core, "requests", None)
        if current is _TRANSPORT:
            return
        if current is not requests:
            raise RuntimeError("wechatpayv3.core no longer uses module-level `requests`; re-check the SDK pin")
        sdk_core.requests = _TRANSPORT


class GatewaySetupError(ValueError):
    """The client cannot be built from this configuration; ``key`` names the configuration key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check_base_url(base_url: str, key: str = "wechat.base_url") -> str:
    # Plain http elsewhere than loopback would expose refunds to the path.
    if not is_safe_gateway_url(base_url):
        raise GatewaySetupError(key, f"URL must be https (plain http only for loopback hosts): {base_url!r}")
    return base_url.rstrip("/")


def _check_notify_url(notify_url: str | None) -> str | None:
    if notify_url is None:
        return None
    parts = urlsplit(notify_url)
    if parts.query:
        raise GatewaySetupError("wechat.notify_url", f"notify_url must not carry a query string: {notify_url!r}")
    _check_base_url(f"{parts.scheme}://{parts.netloc}", "wechat.notify_url")  # https, or http on loopback for the sandbox
    return notify_url


def _answer_is_about(result: Any) -> str | None:
    """The number a verified answer names (refund or trade), to compare with the one asked about."""
    if isinstance(result, Accepted):
        return result.refund.out_refund_no
    if isinstance(result, PaymentState):
        return result.payment.out_trade_no
    return None


def _check_trade_no(out_trade_no: str) -> None:
    if not isinstance(out_trade_no, str) or not OUT_TRADE_NO_PATTERN.match(out_trade_no):
        raise ValueError(f"out_trade_no must match {OUT_TRADE_NO_PATTERN.pattern}: {out_trade_no!r}")


# RSA-OAEP (SHA-1) on a 2048-bit key encrypts at most 214 bytes; a longer value would fail inside the SDK.
SECRET_MAX_BYTES = 200


def _as_secret(value: Secret | str | None) -> Secret | None:
    return Secret(value) if isinstance(value, str) else value


def _check_abnormal(
    refund_id: str, out_refund_no: str, to: str, bank_type: str | None, account: Secret | None, name: Secret | None
) -> None:
    """ValueError for a malformed abnormal refund; messages name the field, never a bank detail's value."""
    if not isinstance(refund_id, str) or not REFUND_ID_PATTERN.match(refund_id):
        raise ValueError(f"refund_id must match {REFUND_ID_PATTERN.pattern}: {refund_id!r}")
    if not isinstance(out_refund_no, str) or not OUT_REFUND_NO_PATTERN.match(out_refund_no):
        raise ValueError(f"out_refund_no must match {OUT_REFUND_NO_PATTERN.pattern}: {out_refund_no!r}")
    if to not in ABNORMAL_REFUND_TYPES:
        raise ValueError(f"to must be one of {sorted(ABNORMAL_REFUND_TYPES)}: {to!r}")
    for field_name, secret in (("bank_account", account), ("real_name", name)):
        if secret is not None and not isinstance(secret, Secret):
            raise TypeError(f"{field_name} must be a Secret or text")
    if to != ABNORMAL_TO_USER:
        if bank_type is not None or account is not None or name is not None:
            raise ValueError(f"{to} takes no bank_type, bank_account or real_name")
        return
    if not isinstance(bank_type, str) or not BANK_TYPE_PATTERN.match(bank_type):
        raise ValueError(f"{ABNORMAL_TO_USER} needs bank_type matching {BANK_TYPE_PATTERN.pattern}")
    for field_name, secret in (("bank_account", account), ("real_name", name)):
        if not secret or len(secret.reveal().encode("utf-8")) > SECRET_MAX_BYTES:
            raise ValueError(f"{ABNORMAL_TO_USER} needs {field_name}: 1 to {SECRET_MAX_BYTES} bytes of text")


# -- the daily bill -------------------------------------------------------------------------------

BILL_ENDPOINTS = ("trade_bill", "download_bill")
_LOGGED_AS = {"trade_bill": "bill_date", "download_bill": "path"}  # what a call's `number` is, in its log record
GZIP_MAGIC = b"\x1f\x8b"  # a bill asked for as GZIP; a plain one starts with a BOM or its header, never with this
_GUNZIP_STEP_BYTES = 1024 * 1024
# What the path and query of a download URL may hold: they are signed as text and sent as a URL,
# and anything `requests` would percent-encode makes the two differ.
_URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%/?&=+:")


def _classify_bill(http_status: int, body: str | bytes | None, request_id: str | None) -> BillResult:
    """One verified answer to trade_bill: BillReady, or the rules every call shares, with
    STATEMENT_CREATING (the bill is being made) a RetryLater rather than a 400's Permanent."""
    if 200 <= http_status < 300:
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else (body or "")
            return BillReady.from_json(json.loads(text), request_id)
        except ValueError as exc:
            return UnknownOutcome("BAD_RESPONSE", f"HTTP {http_status} without a readable bill answer: {exc}", request_id)
    result = classify(http_status, body, request_id)
    if isinstance(result, Permanent) and result.code == STATEMENT_CREATING:
        return RetryLater(result.code, result.message, request_id)
    return result


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _download_path(url: str, base_url: str) -> str:
    """The path and query of a download URL on the gateway's own origin (scheme, host, port and any
    path prefix of base_url); BillDownloadFailed(Permanent UNTRUSTED_URL) for any other, before a
    byte is sent: the request carries our signature, which must never go to a host we did not choose."""
    try:
        parts, base = urlsplit(url), urlsplit(base_url)
        port, base_port = parts.port or _default_port(parts.scheme), base.port or _default_port(base.scheme)
    except ValueError:
        parts = None
    if (
        parts is None
        or (parts.scheme, parts.hostname, port) != (base.scheme, base.hostname, base_port)
        or parts.username is not None
        or parts.password is not None
        or parts.fragment
        or not parts.path.startswith(base.path + "/")
    ):
        raise BillDownloadFailed(Permanent("UNTRUSTED_URL", "the download_url is not on the gateway's host; not requested"))
    rest = parts.path[len(base.path) :] + (f"?{parts.query}" if parts.query else "")
    if not set(rest) <= _URL_SAFE:
        raise BillDownloadFailed(Permanent("UNTRUSTED_URL", "the download_url holds characters that would not sign as sent"))
    return rest


def _gunzip_within(data: bytes, max_bytes: int) -> bytes:
    """Decompress every gzip member of ``data``, never holding more than max_bytes (+1 step) of output:
    a small file that inflates to gigabytes stops at the cap."""
    out = bytearray()
    rest = data
    try:
        while rest:
            inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            pending = rest
            while not inflate.eof:
                piece = inflate.decompress(pending, min(_GUNZIP_STEP_BYTES, max_bytes - len(out) + 1))
                pending = inflate.unconsumed_tail
                if not piece and not pending:  # all input taken, nothing more comes out, no end marker
                    raise BillDownloadFailed(Permanent("BAD_GZIP", "the gzip stream is truncated"))
                out += piece
                if len(out) > max_bytes:
                    raise BillDownloadFailed(Permanent("TOO_LARGE", f"the bill decompresses to over {max_bytes} bytes"))
            rest = inflate.unused_data.lstrip(b"\0")  # gzip(1) tolerates zero padding after the last member
    except zlib.error as exc:
        raise BillDownloadFailed(Permanent("BAD_GZIP", f"the bill is not valid gzip: {exc}")) from None
    return bytes(out)


def _canonical_signature_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # The SDK looks headers up by exact spelling; servers and frameworks hand them over in any case.
    lowered = {str(k).lower(): v for k, v in headers.items()}
    return {name: lowered[name.lower()] for name in SIGNATURE_HEADERS if name.lower() in lowered}


class WeChatPayGateway:
    """RefundGateway for WeChat Pay v3 (public key mode). Thread-safe; share one per process."""

    def __init__(
        self,
        *,
        mchid: str,
        appid: str,
        merchant_serial_no: str,
        merchant_private_key_pem: str,
        platform_public_key_pem: str,
        platform_public_key_id: str,
        apiv3_key: str,
        base_url: str = LIVE_BASE_URL,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT_SECONDS,
        apply_qps: float | None = DEFAULT_APPLY_QPS,
        query_qps: float | None = DEFAULT_QUERY_QPS,
        notify_url: str | None = None,
        reuse_connections: bool = True,
        min_call_seconds: float = MIN_CALL_SECONDS,
        pay_query_qps: float | None = DEFAULT_PAY_QUERY_QPS,
        pay_close_qps: float | None = DEFAULT_PAY_CLOSE_QPS,
    ) -> None:
        if len(apiv3_key.encode("utf-8")) != APIV3_KEY_BYTES:
            raise GatewaySetupError("WECHATPAY_APIV3_KEY", f"the APIv3 key must be {APIV3_KEY_BYTES} bytes")
        connect_timeout, read_timeout = timeout
        if connect_timeout <= 0 or read_timeout <= 0:
            raise GatewaySetupError("wechat.timeout_seconds", f"timeout must be two positive numbers (connect, read): {timeout!r}")
        if min_call_seconds <= 0:
            raise ValueError(f"min_call_seconds must be positive: {min_call_seconds!r}")
        self._timeout = (float(connect_timeout), float(read_timeout))
        self._min_call_seconds = min_call_seconds
        self._base_url = _check_base_url(base_url)
        notify_url = _check_notify_url(notify_url)
        self._mchid = mchid
        self._merchant_serial_no = merchant_serial_no
        self._public_key_id = platform_public_key_id
        # Pace a little under the limit: calls leave on their slots, but thread wake-ups and
        # the network jitter their arrival, and WeChat counts arrivals per second.
        self._limiters = {
            endpoint: RateLimiter(qps * PACING_HEADROOM if qps else None)
            for endpoint, qps in zip(ENDPOINTS, (apply_qps, query_qps, pay_query_qps, pay_close_qps))
        }
        # An operator's command sends one at a time, and WeChat publishes no limit for it: unpaced.
        self._limiters["abnormal"] = RateLimiter(None)
        # The daily bill: one apply and one download a day; WeChat publishes no limit for either.
        self._limiters.update({endpoint: RateLimiter(None) for endpoint in BILL_ENDPOINTS})
        self._reuse_connections = reuse_connections
        _install_transport()
        try:
            # Public key mode: no network call here (certificate mode would GET /v3/certificates at once).
            # logger=None: the SDK's own debug logging prints the Authorization header.
            self._wxpay = WeChatPay(
                wechatpay_type=WeChatPayType.NATIVE,
                mchid=mchid,
                private_key=merchant_private_key_pem,
                cert_serial_no=merchant_serial_no,
                appid=appid,
                apiv3_key=apiv3_key,
                notify_url=notify_url,
                logger=None,
                timeout=tuple(timeout),
                public_key=platform_public_key_pem,
                public_key_id=platform_public_key_id,
            )
        except Exception:
            # The SDK's message is generic; ours must not echo the PEM it could not parse.
            raise GatewaySetupError(
                "wechat.merchant_private_key_file", "the merchant private key or the platform public key is not a valid PEM"
            ) from None
        # Core hard-codes the live host; the signed path carries no host, so
        # pointing it at the emulator (or a proxy) leaves signatures valid.
        self._wxpay._core._gate_way = self._base_url
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        # An observer of every answer (endpoint, result): the monitoring's counters. Never sees a number.
        self.on_answer: Callable[[str, Any], None] | None = None

    # -- RefundGateway -------------------------------------------------------

    def apply(self, req: RefundRequest, *, deadline: Callable[[], float] | None = None) -> GatewayResult:
        # Always out_trade_no, never transaction_id: the SDK sends only one of
        # them, and a replay must carry the very body of the first attempt even
        # if the row learned its transaction_id in between.
        return self._call(
            "apply",
            req.out_refund_no,
            lambda: self._wxpay.refund(
                out_refund_no=req.out_refund_no,
                amount={"refund": req.refund_amount, "total": req.total_amount, "currency": "CNY"},
                out_trade_no=req.out_trade_no,
                reason=req.reason,
            ),
            deadline,
        )

    def query(self, out_refund_no: str, *, deadline: Callable[[], float] | None = None) -> GatewayResult:
        if not OUT_REFUND_NO_PATTERN.match(out_refund_no):
            raise ValueError(f"out_refund_no must match {OUT_REFUND_NO_PATTERN.pattern}: {out_refund_no!r}")
        return self._call("query", out_refund_no, lambda: self._wxpay.query_refund(out_refund_no), deadline)

    # -- PaymentGateway ------------------------------------------------------

    def query_payment(self, out_trade_no: str, *, deadline: Callable[[], float] | None = None) -> PaymentResult:
        """The trade's state by our out_trade_no (an order never paid has no transaction_id)."""
        _check_trade_no(out_trade_no)
        return self._call("pay_query", out_trade_no, lambda: self._wxpay.query(out_trade_no=out_trade_no), deadline)

    def close_payment(self, out_trade_no: str, *, deadline: Callable[[], float] | None = None) -> PaymentResult:
        """Ask WeChat to close the trade; a 204 is CloseSent, never proof (query after it)."""
        _check_trade_no(out_trade_no)
        return self._call("pay_close", out_trade_no, lambda: self._wxpay.close(out_trade_no=out_trade_no), deadline)

    # -- AbnormalRefundGateway -----------------------------------------------

    def abnormal_refund(
        self,
        refund_id: str,
        out_refund_no: str,
        *,
        to: str,
        bank_type: str | None = None,
        bank_account: Secret | str | None = None,
        real_name: Secret | str | None = None,
        deadline: Callable[[], float] | None = None,
    ) -> GatewayResult:
        """Send an ABNORMAL refund on to a bank card: POST .../refunds/{refund_id}/apply-abnormal-refund.

        ``to`` is MERCHANT_BANK_CARD (nothing else) or USER_BANK_CARD (``bank_type``, ``bank_account``
        and ``real_name``). The last two are Secrets (plain text is wrapped at once): their text goes
        to the SDK, which encrypts it with the platform public key, and nowhere else; nothing here
        keeps, logs or names it. Accepted carries the refund object (status PROCESSING again).
        """
        account, name = _as_secret(bank_account), _as_secret(real_name)
        _check_abnormal(refund_id, out_refund_no, to, bank_type, account, name)
        return self._call(
            "abnormal",
            out_refund_no,
            lambda: self._wxpay.abnormal_refund(
                refund_id=refund_id,
                out_refund_no=out_refund_no,
                type=to,
                bank_type=bank_type,
                # Revealed inside the call, not before: no variable of ours ever holds the text.
                bank_account=account.reveal() if account is not None else None,
                real_name=name.reveal() if name is not None else None,
            ),
            deadline,
        )

    # -- BillGateway -----------------------------------------------------------

    def trade_bill(
        self, bill_date: date, *, bill_type: str = "ALL", deadline: Callable[[], float] | None = None
    ) -> BillResult:
        """Apply for the day's bill (a Beijing-time day): BillReady with its SHA1 and download URL;
        RetryLater STATEMENT_CREATING while WeChat makes it; Permanent NO_STATEMENT_EXIST for a
        day without trades; otherwise the usual classes. Always asks for GZIP."""
        if not isinstance(bill_date, date) or isinstance(bill_date, datetime):
            raise ValueError(f"bill_date must be a date: {bill_date!r}")
        if bill_type not in BILL_TYPES:
            raise ValueError(f"bill_type must be one of {sorted(BILL_TYPES)}: {bill_type!r}")
        day = bill_date.isoformat()
        return self._call("trade_bill", day, lambda: self._wxpay.trade_bill(day, bill_type=bill_type, tar_type="GZIP"), deadline)

    def download_bill(
        self,
        url: str,
        *,
        max_bytes: int = DEFAULT_BILL_MAX_BYTES,
        max_seconds: float = DEFAULT_BILL_DOWNLOAD_SECONDS,
        deadline: Callable[[], float] | None = None,
    ) -> bytes:
        """The bill at ``url`` (trade_bill's download_url), decompressed; its SHA1 is not checked here.

        Signed like every call, but only to base_url's own host (BillDownloadFailed UNTRUSTED_URL,
        with nothing sent, for any other). No redirect is followed; the answer is not signed by
        WeChat, so none is verified. At most max_bytes are read from the wire and at most max_bytes
        come out of decompression; the whole download, connect to last byte, ends by
        min(now + max_seconds, deadline()). Raises BillDownloadFailed for every failure.
        """
        if self._closed:
            raise RuntimeError("the gateway is closed")
        if max_bytes <= 0 or max_seconds <= 0:
            raise ValueError("max_bytes and max_seconds must be positive")
        started = time.perf_counter()
        capture = _Capture()
        logged = "-"  # the path without its query: the token stays out of logs
        try:
            path = _download_path(url, self._base_url)
            logged = path.split("?", 1)[0]
            budget = _Budget(self._timeout, self._min_call_seconds, self._limiter("download_bill"), deadline, max_seconds)
            try:
                budget.check_time_left(time.monotonic())
            except CallNotSent as exc:
                raise BillDownloadFailed(NotSent(exc.code, exc.message)) from None
            data = self._fetch_bill_file(budget, capture, path, max_bytes)
            if data[:2] == GZIP_MAGIC:
                data = _gunzip_within(data, max_bytes)
        except BillDownloadFailed as failed:
            self._log_call("download_bill", logged, capture, started, failed.result)
            if self.on_answer is not None:
                self.on_answer("download_bill", failed.result)
            raise
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        _log.bind(action="download_bill", path=logged, http_status=capture.status, request_id=capture.request_id,
                  bytes=len(data), elapsed_ms=elapsed_ms).debug("bill downloaded: {} bytes", len(data))
        return data

    def _fetch_bill_file(self, budget: _Budget, capture: _Capture, path: str, max_bytes: int) -> bytes:
        with self._session() as session:
            binding = _Binding(session, self._public_key_id, budget, capture, max_bytes=max_bytes, signed=False)
            try:
                with _TRANSPORT.bound(binding):
                    # The SDK signs the path it strips base_url from, and skips verification for a download.
                    status, body = self._wxpay.download_bill(self._base_url + path)
            except Exception as exc:
                result = classify_exception(exc, capture.request_id)
                if result is None:
                    raise
                if result.code == "ANSWER_TOO_LARGE":  # the same bytes again next time: not worth a retry
                    result = Permanent("TOO_LARGE", f"{result.message} (max_bytes)", result.request_id)
                raise BillDownloadFailed(result) from None
        if 200 <= status < 300:
            return body.encode("utf-8") if isinstance(body, str) else bytes(body)
        result = classify(status, body, capture.request_id)
        if isinstance(result, UnknownOutcome) and result.code == "REDIRECT":
            # Where a bill's URL sends us elsewhere, it will again: a person must look, not a retry loop.
            result = Permanent(result.code, result.message, result.request_id)
        raise BillDownloadFailed(result)

    def calls_within(self, endpoint: str, seconds: float) -> int | None:
        """How many `endpoint` calls (one of ENDPOINTS) the pacer can still start within `seconds`
        from now, after the slots other threads have booked; None when unpaced. Books nothing."""
        return self._limiter(endpoint).calls_within(seconds)

    def close(self) -> None:
        self._closed = True
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- notifications ---------------------------------------------------------

    def parse_notification(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any] | None:
        """Verify and decrypt a refund notification; None when it is not provably from WeChat.

        Returns the envelope with `resource` decrypted to a dict. Does not check
        the timestamp's age or duplicates: that is NotifyServer's job.
        """
        signature_headers = _canonical_signature_headers(headers)
        if signature_headers.get("Wechatpay-Serial") != self._public_key_id:
            # Any other serial sends the SDK to download certificates from WeChat on a stranger's request.
            return None
        try:
            envelope = self._wxpay.callback(signature_headers, body)
        except ValueError:  # bad JSON, bad base64 or bad UTF-8 in a body whose signature passed
            return None
        except Exception as exc:
            if is_sdk_signature_error(exc):
                return None
            raise
        if not isinstance(envelope, dict) or not isinstance(envelope.get("resource"), dict):
            return None
        return envelope

    # -- internals ---------------------------------------------------------------

    def _limiter(self, endpoint: str) -> RateLimiter:
        if endpoint not in self._limiters:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}: {endpoint!r}")
        return self._limiters[endpoint]

    @contextmanager
    def _session(self) -> Iterator[requests.Session]:
        if not self._reuse_connections:
            with new_session(self._base_url) as session:  # one connection per call, as the SDK does
                yield session
            return
        session = getattr(self._local, "session", None)
        if session is None:
            session = new_session(self._base_url)
            with self._sessions_lock:
                self._sessions.append(session)
            self._local.session = session
        yield session

    def _call(
        self,
        action: str,
        number: str,
        send: Callable[[], tuple[int, str | bytes]],
        deadline: Callable[[], float] | None,
    ) -> GatewayResult:
        if self._closed:
            raise RuntimeError("the gateway is closed")
        started = time.perf_counter()
        budget = _Budget(self._timeout, self._min_call_seconds, self._limiter(action), deadline)
        capture = _Capture()
        try:
            # Checked before the SDK signs too: a call that cannot finish costs no RSA signature.
            budget.check_time_left(time.monotonic())
        except CallNotSent as exc:
            result: GatewayResult = NotSent(exc.code, exc.message)
        else:
            result = self._send(action, budget, capture, send)
        about = _answer_is_about(result)
        if about is not None and about != number:
            # A verified answer about another refund or trade: we cannot tell what happened to ours.
            result = UnknownOutcome("RESPONSE_MISMATCH", f"answer is about {about!r}", result.request_id)
        self._log_call(action, number, capture, started, result)
        if self.on_answer is not None:
            self.on_answer(action, result)
        return result

    def _send(self, action: str, budget: _Budget, capture: _Capture, send: Callable[[], tuple[int, str | bytes]]) -> GatewayResult:
        with self._session() as session, _TRANSPORT.bound(_Binding(session, self._public_key_id, budget, capture)):
            try:
                status, body = send()
            except Exception as exc:
                result = classify_exception(exc, capture.request_id)
                if result is None:
                    raise
                return result
        if action == "trade_bill":
            return _classify_bill(status, body, capture.request_id)
        if action in ("pay_query", "pay_close"):
            return classify_payment(action, status, body, capture.request_id)
        return classify(status, body, capture.request_id)

    @staticmethod
    def _log_call(action: str, number: str, capture: _Capture, started: float, result: GatewayResult) -> None:
        _log.bind(
            action=action,
            **{_LOGGED_AS.get(action) or ("out_trade_no" if action.startswith("pay_") else "out_refund_no"): number},
            http_status=capture.status,
            request_id=capture.request_id,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
            outcome=type(result).__name__,
            code=getattr(result, "code", None),
        ).debug("{} answered: {}", action, result.describe())

    def __repr__(self) -> str:
        return (
            f"WeChatPayGateway(mchid={self._mchid!r}, base_url={self._base_url!r}, "
            f"merchant_serial_no={self._merchant_serial_no!r}, platform_public_key_id={self._public_key_id!r}, "
            f"apply_qps={self._limiters['apply'].qps!r}, query_qps={self._limiters['query'].qps!r})"
        )
