"""The daily bill's client: WeChatPayGateway.trade_bill and download_bill (the BillGateway half).

trade_bill is a call like the others (signed both ways). Its download goes
through the same stand-in (gateway.calls) with three differences: it goes only
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
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from loguru import logger
from wechatpayv3 import WeChatPay

from cancel_scanner.gateway.calls import TRANSPORT, Binding, Budget, Capture, log_call
from cancel_scanner.gateway.classify import CallNotSent, classify, classify_exception
from cancel_scanner.gateway.contract import (
    BILL_TYPES,
    DEFAULT_BILL_DOWNLOAD_SECONDS,
    DEFAULT_BILL_MAX_BYTES,
    STATEMENT_CREATING,
    Accepted,
    BillDownloadFailed,
    BillReady,
    BillResult,
    NotSent,
    Permanent,
    RetryLater,
    UnknownOutcome,
)

if TYPE_CHECKING:
    import requests

    from cancel_scanner.gateway.ratelimit import RateLimiter

BILL_ENDPOINTS = ("trade_bill", "download_bill")
GZIP_MAGIC = b"\x1f\x8b"  # a bill asked for as GZIP; a plain one starts with a BOM or its header, never with this
_GUNZIP_STEP_BYTES = 1024 * 1024
# What the path and query of a download URL may hold: they are signed as text and sent as a URL,
# and anything `requests` would percent-encode makes the two differ.
_URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%/?&=+:")

_log = logger.bind(component="gateway")


def classify_bill(http_status: int, body: str | bytes | None, request_id: str | None) -> BillResult:
    """One verified answer to trade_bill: BillReady, or the rules every call shares, with
    STATEMENT_CREATING (the bill is being made) a RetryLater rather than a 400's Permanent."""
    if 200 <= http_status < 300:
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else (body or "")
            return BillReady.from_json(json.loads(text), request_id)
        except ValueError as exc:
            return UnknownOutcome(
                "BAD_RESPONSE", f"HTTP {http_status} without a readable bill answer: {exc}", request_id
            )
    result = classify(http_status, body, request_id)
    assert not isinstance(result, Accepted), "classify answers Accepted only to a 2xx"
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
        raise BillDownloadFailed(
            Permanent("UNTRUSTED_URL", "the download_url is not on the gateway's host; not requested")
        )
    rest = parts.path[len(base.path) :] + (f"?{parts.query}" if parts.query else "")
    if not set(rest) <= _URL_SAFE:
        raise BillDownloadFailed(
            Permanent("UNTRUSTED_URL", "the download_url holds characters that would not sign as sent")
        )
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


class BillClient:
    """Mixed into WeChatPayGateway, which gives it the SDK, the sessions, the pacers and `_call`:
    a bill is one more call of the gateway's, not a client of its own."""

    # Set by WeChatPayGateway.__init__; its _call, _limiter and _session are used as well (declared below).
    _wxpay: WeChatPay
    _base_url: str
    _public_key_id: str
    _timeout: tuple[float, float]
    _min_call_seconds: float
    _closed: bool
    on_answer: Callable[[str, Any], None] | None
    if TYPE_CHECKING:

        def _call(
            self,
            action: Literal["trade_bill"],
            number: str,
            send: Callable[[], tuple[int, str | bytes]],
            deadline: Callable[[], float] | None,
        ) -> BillResult: ...

        def _limiter(self, endpoint: str) -> RateLimiter: ...

        def _session(self) -> AbstractContextManager[requests.Session]: ...

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
        return self._call(
            "trade_bill", day, lambda: self._wxpay.trade_bill(day, bill_type=bill_type, tar_type="GZIP"), deadline
        )

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
        capture = Capture()
        logged = "-"  # the path without its query: the token stays out of logs
        try:
            path = _download_path(url, self._base_url)
            logged = path.split("?", 1)[0]
            budget = Budget(
                self._timeout, self._min_call_seconds, self._limiter("download_bill"), deadline, max_seconds
            )
            try:
                budget.check_time_left(time.monotonic())
            except CallNotSent as exc:
                raise BillDownloadFailed(NotSent(exc.code, exc.message)) from None
            data = self._fetch_bill_file(budget, capture, path, max_bytes)
            if data[:2] == GZIP_MAGIC:
                data = _gunzip_within(data, max_bytes)
        except BillDownloadFailed as failed:
            log_call("download_bill", logged, capture, started, failed.result)
            if self.on_answer is not None:
                self.on_answer("download_bill", failed.result)
            raise
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        _log.bind(
            action="download_bill",
            path=logged,
            http_status=capture.status,
            request_id=capture.request_id,
            bytes=len(data),
            elapsed_ms=elapsed_ms,
        ).debug("bill downloaded: {} bytes", len(data))
        return data

    def _fetch_bill_file(self, budget: Budget, capture: Capture, path: str, max_bytes: int) -> bytes:
        with self._session() as session:
            binding = Binding(session, self._public_key_id, budget, capture, max_bytes=max_bytes, signed=False)
            try:
                with TRANSPORT.bound(binding):
                    # The SDK signs the path it strips base_url from, and skips verification for a download.
                    status, body = self._wxpay.download_bill(self._base_url + path)
            except Exception as exc:
                failure: UnknownOutcome | NotSent | Permanent | None = classify_exception(exc, capture.request_id)
                if failure is None:
                    raise
                if failure.code == "ANSWER_TOO_LARGE":  # the same bytes again next time: not worth a retry
                    failure = Permanent("TOO_LARGE", f"{failure.message} (max_bytes)", failure.request_id)
                raise BillDownloadFailed(failure) from None
        if 200 <= status < 300:
            return body.encode("utf-8") if isinstance(body, str) else bytes(body)
        result = classify(status, body, capture.request_id)
        assert not isinstance(result, Accepted), "classify answers Accepted only to a 2xx"
        if isinstance(result, UnknownOutcome) and result.code == "REDIRECT":
            # Where a bill's URL sends us elsewhere, it will again: a person must look, not a retry loop.
            result = Permanent(result.code, result.message, result.request_id)
        raise BillDownloadFailed(result)
