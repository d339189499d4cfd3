"""The live RefundGateway: WeChat Pay API v3 refunds through the `wechatpayv3` SDK (pinned to 2.0.4).

The SDK signs requests and verifies 2xx answers; we pace calls, bound them
in time and size, classify every answer into a GatewayResult and keep secrets
out of logs.

What lives next door: gateway.calls holds one call's plumbing (the pacing and
deadline budget, the stand-in for `requests` inside the SDK that reuses
connections, captures the Request-ID and refuses a 2xx signed under another
serial, and the call's log record); gateway.bills holds the daily bill's
client, mixed into WeChatPayGateway as BillClient.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, TypeAlias, cast, overload

import requests
from wechatpayv3 import WeChatPay, WeChatPayType

from cancel_scanner.engine.clock import MIN_CALL_SECONDS
from cancel_scanner.gateway.bills import (  # noqa: F401 - GZIP_MAGIC and _gunzip_within are read from here too
    BILL_ENDPOINTS,
    GZIP_MAGIC,
    BillClient,
    _gunzip_within,
    classify_bill,
)
from cancel_scanner.gateway.calls import (  # noqa: F401 - MAX_ANSWER_BYTES is read from here too
    MAX_ANSWER_BYTES,
    TRANSPORT,
    Binding,
    Budget,
    Capture,
    install_transport,
    log_call,
)
from cancel_scanner.gateway.classify import (
    CallNotSent,
    classify,
    classify_exception,
    classify_payment,
    is_sdk_signature_error,
)
from cancel_scanner.gateway.contract import (
    FOREIGN_PAYMENT,
    OUT_REFUND_NO_PATTERN,
    TRADE_NOT_FOUND_CODES,
    BillResult,
    GatewayResult,
    NoSuchTrade,
    NotSent,
    PaymentResult,
    PaymentState,
    Permanent,
    RefundRequest,
    Secret,
    UnknownOutcome,
)
from cancel_scanner.gateway.notify import HeaderPairs
from cancel_scanner.gateway.pace_share import PaceShare
from cancel_scanner.gateway.ratelimit import RateLimiter
from cancel_scanner.gateway.transport import new_session
from cancel_scanner.gateway.wechat_checks import (
    GatewaySetupError,
    _answer_is_about,
    _as_secret,
    _canonical_signature_headers,
    _check_abnormal,
    _check_base_url,
    _check_notify_url,
    _check_trade_no,
)
from cancel_scanner.gateway.wechat_config import (  # the defaults are the `wechat:` section's, declared there
    APIV3_KEY_BYTES,
    DEFAULT_APPLY_QPS,
    DEFAULT_PAY_CLOSE_QPS,
    DEFAULT_PAY_QUERY_QPS,
    DEFAULT_QUERY_QPS,
    DEFAULT_TIMEOUT_SECONDS,
)

LIVE_BASE_URL = "https://api.mch.weixin.qq.com"
# What _call answers, by its action: a refund call a GatewayResult, a payment call a PaymentResult,
# trade_bill a BillResult.
_CallResult: TypeAlias = GatewayResult | PaymentResult | BillResult
_Send: TypeAlias = Callable[[], tuple[int, str | bytes]]
_Deadline: TypeAlias = Callable[[], float] | None
PACING_HEADROOM = 0.95  # of apply_qps / query_qps; see __init__
ENDPOINTS = ("apply", "query", "pay_query", "pay_close", "abnormal")
SIGNATURE_MAX_AGE_SECONDS = 300  # WeChat refuses our signatures 5 minutes off; so do we its


class WeChatPayGateway(BillClient):
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
        qps_shared: bool = True,
    ) -> None:
        if len(apiv3_key.encode("utf-8")) != APIV3_KEY_BYTES:
            raise GatewaySetupError("WECHATPAY_APIV3_KEY", f"the APIv3 key must be {APIV3_KEY_BYTES} bytes")
        connect_timeout, read_timeout = timeout
        if connect_timeout <= 0 or read_timeout <= 0:
            raise GatewaySetupError(
                "wechat.timeout_seconds", f"timeout must be two positive numbers (connect, read): {timeout!r}"
            )
        if min_call_seconds <= 0:
            raise ValueError(f"min_call_seconds must be positive: {min_call_seconds!r}")
        self._timeout = (float(connect_timeout), float(read_timeout))
        self._min_call_seconds = min_call_seconds
        self._base_url = _check_base_url(base_url)
        notify_url = _check_notify_url(notify_url)
        self._mchid = mchid
        self._appid = appid
        self._merchant_serial_no = merchant_serial_no
        self._public_key_id = platform_public_key_id
        # Pace a little under the limit: calls leave on their slots, but thread wake-ups and
        # the network jitter their arrival, and WeChat counts arrivals per second.
        self._paces = dict(zip(ENDPOINTS, (apply_qps, query_qps, pay_query_qps, pay_close_qps)))
        self._limiters = {
            endpoint: RateLimiter(qps * PACING_HEADROOM if qps else None) for endpoint, qps in self._paces.items()
        }
        # WeChat's limits are per merchant: processes of one mchid share them (None: each paces alone).
        self.pace_group: str | None = mchid if qps_shared else None
        # An operator's command sends one at a time, and WeChat publishes no limit for it: unpaced.
        self._limiters["abnormal"] = RateLimiter(None)
        # The daily bill: one apply and one download a day; WeChat publishes no limit for either.
        self._limiters.update({endpoint: RateLimiter(None) for endpoint in BILL_ENDPOINTS})
        self._reuse_connections = reuse_connections
        self.sandbox: Any = None  # set by gateway.sandbox.start_sandbox: the emulator this client talks to
        install_transport()
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
        except Exception:  # noqa: BLE001
            # The SDK's message is generic; ours must not echo the PEM it could not parse.
            raise GatewaySetupError(
                "wechat.merchant_private_key_file",
                "the merchant private key or the platform public key is not a valid PEM",
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

    def calls_within(self, endpoint: str, seconds: float) -> int | None:
        """How many `endpoint` calls (one of ENDPOINTS) the pacer can still start within `seconds`
        from now, after the slots other threads have booked; None when unpaced. Books nothing."""
        return self._limiter(endpoint).calls_within(seconds)

    def pace_limits(self) -> dict[str, float]:
        """The merchant's limits (QPS per endpoint) this client was configured with."""
        return {endpoint: float(qps) for endpoint, qps in self._paces.items() if qps}

    def share_pace(
        self, sharers: int, hold_seconds: float = 0.0, limits: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Pace each endpoint at a `sharers`-th of its configured QPS (the merchant's limit shared by that
        many processes), and start no call for the next `hold_seconds` (0: leave any hold running).
        Returns the new paces.

        WeChat counts arrivals per one-second window. A strictly paced process at r calls/s lands at
        most floor(r) + 1 of them in one window, so N unsynchronised processes land up to N more than
        N x r: each of the others gives up one call a second, and N x floor(r) + N stays within the
        pace one process alone would keep."""
        if sharers < 1:
            raise ValueError(f"sharers must be at least 1: {sharers!r}")
        paces = {}
        for endpoint, qps in self._paces.items():
            if qps and limits and endpoint in limits:
                qps = min(qps, limits[endpoint])  # another process of the merchant was given a lower limit
            if qps:
                whole = qps * PACING_HEADROOM
                paces[endpoint] = max((whole - (sharers - 1)) / sharers, whole / (2 * sharers))
                self._limiters[endpoint].set_qps(paces[endpoint])
        if hold_seconds > 0:  # a hold only ever starts here; it ends by itself, never cut short by a new count
            for endpoint in self._paces:
                self._limiters[endpoint].hold_until(time.monotonic() + hold_seconds)
        return paces

    def pace_share(self, heartbeat_seconds: float) -> PaceShare | None:
        """The merchant's limits shared with its other live processes, as the registry counts them; None
        when this client paces alone (qps_shared off) or calls nothing paced."""
        if self.pace_group is None or not self.pace_limits():
            return None
        return PaceShare(self, self.pace_group, heartbeat_seconds)

    def held_for(self, endpoint: str) -> float:
        """Seconds until `endpoint`'s pacer lets calls start again after share_pace's hold (0: now)."""
        return self._limiter(endpoint).held_for()

    def close(self) -> None:
        self._closed = True
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- notifications ---------------------------------------------------------

    def parse_notification(self, headers: HeaderPairs, body: bytes) -> dict[str, Any] | None:
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
        shared: requests.Session | None = getattr(self._local, "session", None)
        if shared is None:
            shared = new_session(self._base_url)
            with self._sessions_lock:
                self._sessions.append(shared)
            self._local.session = shared
        yield shared

    @overload
    def _call(
        self, action: Literal["apply", "query", "abnormal"], number: str, send: _Send, deadline: _Deadline
    ) -> GatewayResult: ...

    @overload
    def _call(
        self, action: Literal["pay_query", "pay_close"], number: str, send: _Send, deadline: _Deadline
    ) -> PaymentResult: ...

    @overload
    def _call(self, action: Literal["trade_bill"], number: str, send: _Send, deadline: _Deadline) -> BillResult: ...

    def _call(
        self,
        action: str,
        number: str,
        send: Callable[[], tuple[int, str | bytes]],
        deadline: Callable[[], float] | None,
    ) -> _CallResult:
        if self._closed:
            raise RuntimeError("the gateway is closed")
        started = time.perf_counter()
        budget = Budget(self._timeout, self._min_call_seconds, self._limiter(action), deadline)
        capture = Capture()
        try:
            # Checked before the SDK signs too: a call that cannot finish costs no RSA signature.
            budget.check_time_left(time.monotonic())
        except CallNotSent as exc:
            result: _CallResult = NotSent(exc.code, exc.message)
        else:
            result = self._send(action, budget, capture, send)
        about = _answer_is_about(result)
        if about is not None and about != number:
            # A verified answer about another refund or trade: we cannot tell what happened to ours.
            result = UnknownOutcome("RESPONSE_MISMATCH", f"answer is about {about!r}", result.request_id)
        elif isinstance(result, PaymentState) and (foreign := result.payment.foreign(self._mchid, self._appid)):
            # Signed, and about our number, but not our merchant's money: never booked, never refunded.
            result = Permanent(FOREIGN_PAYMENT, f"{foreign}: not booked; check the trade by hand", result.request_id)
        # log_call reads only what every result has (its class, code and describe()); its annotation
        # (gateway.calls) still names the refund calls' GatewayResult alone.
        log_call(action, number, capture, started, cast(GatewayResult, result))
        if self.on_answer is not None:
            self.on_answer(action, result)
        return result

    def _send(
        self, action: str, budget: Budget, capture: Capture, send: Callable[[], tuple[int, str | bytes]]
    ) -> _CallResult:
        with self._session() as session, TRANSPORT.bound(Binding(session, self._public_key_id, budget, capture)):
            try:
                status, body = send()
            except Exception as exc:
                failure = classify_exception(exc, capture.request_id)
                if failure is None:
                    raise
                return failure
        if action == "trade_bill":
            return classify_bill(status, body, capture.request_id)
        if action in ("pay_query", "pay_close"):
            result = classify_payment(action, status, body, capture.request_id)
            if action == "pay_close" and isinstance(result, Permanent) and result.code in TRADE_NOT_FOUND_CODES:
                # Proof that nobody can pay the trade only if WeChat signed it: an error's signature
                # the SDK does not check, so it is checked here (a proxy's 404 proves nothing).
                if self._signed_by_wechat(capture, body):
                    return NoSuchTrade(result.code, result.request_id)
                return UnknownOutcome(
                    "UNSIGNED_ANSWER", f"{result.code} to a close, without WeChat's signature", result.request_id
                )
            return result
        return classify(status, body, capture.request_id)

    def _signed_by_wechat(self, capture: Capture, body: str | bytes) -> bool:
        """An answer's signature verifies under our platform key, and is fresh: an error body names no
        trade, so an old signed ORDER_NOT_EXIST replayed by whatever sits in between is refused."""
        headers = capture.signature or {}
        if headers.get("Wechatpay-Serial") != self._public_key_id:
            return False
        try:
            if abs(time.time() - int(headers.get("Wechatpay-Timestamp", ""))) > SIGNATURE_MAX_AGE_SECONDS:
                return False
        except ValueError:
            return False
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        try:
            return bool(self._wxpay._core._verify_signature(headers, text))
        except Exception:  # noqa: BLE001 - malformed headers: not WeChat's
            return False

    def __repr__(self) -> str:
        return (
            f"WeChatPayGateway(mchid={self._mchid!r}, base_url={self._base_url!r}, "
            f"merchant_serial_no={self._merchant_serial_no!r}, platform_public_key_id={self._public_key_id!r}, "
            f"apply_qps={self._limiters['apply'].qps!r}, query_qps={self._limiters['query'].qps!r})"
        )
