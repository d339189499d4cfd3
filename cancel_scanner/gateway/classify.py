"""Turn a WeChat Pay answer (or a failure to get one) into exactly one GatewayResult.

Pure functions, one table: the facts sheet's "Errors and what the client must
do". The rule behind the table: anything that might have reached WeChat and
might have been accepted is UnknownOutcome, because the only safe move then is
to retry with the same out_refund_no, which WeChat deduplicates.

Lookup order: 2xx -> parse the refund object; 3xx -> unknown (REDIRECT: the
client never follows one, see gateway.wechat); 429 and every 5xx -> unknown
whatever the code; 401 -> ConfigError whatever the code (authentication fails
only on our keys, serial or clock); other 4xx -> the (status, code) table,
else Permanent; anything else (1xx) -> unknown.

The one outcome that is not about an answer at all, NotSent, comes from
CallNotSent: the client gave up before a single byte left.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from cancel_scanner.gateway.contract import (
    Accepted,
    CloseSent,
    ConfigError,
    GatewayResult,
    NotSent,
    Payment,
    PaymentResult,
    PaymentState,
    Permanent,
    Refund,
    RetryLater,
    UnknownOutcome,
)

# RESOURCE_NOT_EXISTS right after payment can be WeChat's own replication lag;
# three answers in a row (spread by the stage's backoff) are no longer lag.
RESOURCE_NOT_EXISTS_GIVE_UP_AFTER = 3

# The SDK's only signal for a 2xx that failed verification is a bare Exception
# with one of these messages (wechatpayv3 2.0.4, core.py `request` and
# `_verify_signature`). The second one is raised when the signature headers are
# missing, e.g. a proxy answering 200 on WeChat's behalf.
SDK_SIGNATURE_MESSAGES = frozenset({"failed to verify the signature"})
SDK_SIGNATURE_MESSAGE_PREFIXES = ("wechatpayv3 does not support this algorithm",)

_BY_STATUS_AND_CODE: dict[tuple[int, str], type] = {
    (403, "NOT_ENOUGH"): RetryLater,
    (404, "RESOURCE_NOT_EXISTS"): RetryLater,
    (400, "PARAM_ERROR"): Permanent,
    (400, "INVALID_REQUEST"): Permanent,
    (403, "USER_ACCOUNT_ABNORMAL"): Permanent,
    (403, "NO_AUTH"): Permanent,
    (404, "MCH_NOT_EXISTS"): ConfigError,
}


class UnverifiedResponse(Exception):
    """A 2xx answer that cannot be trusted (e.g. signed with a key we were not given)."""


class AnswerTooLarge(Exception):
    """The answer's body went over the client's cap; the client stopped reading it."""


class CallNotSent(Exception):
    """The client gave up before sending: the caller's deadline could not be met. Nothing reached WeChat."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _text(body: str | bytes | None) -> str:
    if body is None:
        return ""
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return body


def _error_fields(status: int, text: str) -> tuple[str, str]:
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("code"), str) and data["code"]:
        return data["code"], str(data.get("message") or "")
    # Not WeChat's error shape (a proxy page, an empty body): keep a hint of it.
    return f"HTTP_{status}", " ".join(text.split())[:200] or "no error body"


def classify(http_status: int, body: str | bytes | None, request_id: str | None) -> GatewayResult:
    """Classify one verified HTTP answer to a refund call (the SDK has already checked a 2xx signature)."""
    text = _text(body)
    if 200 <= http_status < 300:
        try:
            return Accepted(Refund.from_json(_object(text)), request_id)
        except ValueError as exc:
            # Signed but not a refund object: WeChat did answer, but we cannot tell what it did.
            return UnknownOutcome(
                "BAD_RESPONSE", f"HTTP {http_status} without a readable refund object: {exc}", request_id
            )
    return _not_2xx(http_status, text, request_id)


# Payment answers that are not errors for us: the stage reads them (a close of a closed trade is
# what we wanted; a paid one is found by the query after it; a user paying right now waits).
_PAYMENT_CODES: dict[tuple[int, str], type] = {
    (404, "ORDER_NOT_EXIST"): Permanent,
    (404, "ORDERNOTEXIST"): Permanent,
    (400, "ORDERPAID"): Permanent,
    (400, "TRADE_ERROR"): Permanent,
    (403, "TRADE_ERROR"): Permanent,
    (403, "RULE_LIMIT"): RetryLater,
    (202, "USER_PAYING"): RetryLater,
    (400, "USER_PAYING"): RetryLater,
}


def classify_payment(call: str, http_status: int, body: str | bytes | None, request_id: str | None) -> PaymentResult:
    """Classify one verified answer to a payment query (``call`` "pay_query") or close ("pay_close")."""
    text = _text(body)
    code, message = _error_fields(http_status, text) if text.strip() else (f"HTTP_{http_status}", "")
    if (http_status, code) in _PAYMENT_CODES:
        kind = _PAYMENT_CODES[(http_status, code)]
        return kind(code, message or code, request_id)
    if call == "pay_close":
        if http_status == 204 or (http_status == 400 and code == "ORDER_CLOSED"):
            return CloseSent(request_id=request_id)
        if 200 <= http_status < 300:
            return UnknownOutcome("BAD_RESPONSE", f"HTTP {http_status} to a close: not WeChat's 204", request_id)
    elif 200 <= http_status < 300:
        try:
            return PaymentState(Payment.from_json(_object(text)), request_id)
        except ValueError as exc:
            return UnknownOutcome(
                "BAD_RESPONSE", f"HTTP {http_status} without a readable payment object: {exc}", request_id
            )
    return _not_2xx(http_status, text, request_id)


def _object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _not_2xx(http_status: int, text: str, request_id: str | None):
    """The rules every call shares for an answer that is not a success."""
    if 300 <= http_status < 400:
        # Never followed (the signed request would go wherever Location points), and
        # whether WeChat, or whoever answered, recorded the original is unknown.
        return UnknownOutcome("REDIRECT", f"HTTP {http_status} redirect, not followed", request_id)
    code, message = _error_fields(http_status, text)
    if http_status == 429 or http_status >= 500:
        return UnknownOutcome(code, message, request_id)
    if http_status == 401:
        return ConfigError(code, message, request_id)
    if 400 <= http_status < 500:
        kind = _BY_STATUS_AND_CODE.get((http_status, code), Permanent)
        if kind is RetryLater:
            give_up = RESOURCE_NOT_EXISTS_GIVE_UP_AFTER if code == "RESOURCE_NOT_EXISTS" else None
            return RetryLater(code, message, request_id, give_up_after=give_up)
        return kind(code, message, request_id)
    return UnknownOutcome(code, f"unexpected HTTP {http_status}: {message}", request_id)


def is_sdk_signature_error(exc: BaseException) -> bool:
    # Exact type match: a subclass of Exception with the same text is someone else's error.
    if type(exc) is not Exception or len(exc.args) != 1 or not isinstance(exc.args[0], str):
        return False
    message = exc.args[0]
    return message in SDK_SIGNATURE_MESSAGES or message.startswith(SDK_SIGNATURE_MESSAGE_PREFIXES)


def classify_exception(exc: BaseException, request_id: str | None = None) -> UnknownOutcome | NotSent | None:
    """UnknownOutcome for transport and signature failures, NotSent for a call given up before sending;
    None for anything else (a bug: let it raise)."""
    if isinstance(exc, CallNotSent):
        return NotSent(exc.code, exc.message, request_id)
    if isinstance(exc, AnswerTooLarge):
        return UnknownOutcome("ANSWER_TOO_LARGE", str(exc), request_id)
    if is_sdk_signature_error(exc) or isinstance(exc, UnverifiedResponse):
        return UnknownOutcome("BAD_SIGNATURE", "answer failed signature verification", request_id)
    if isinstance(exc, requests.ConnectTimeout):
        # Probably never sent, but "probably" is not enough to pick a new number.
        return UnknownOutcome("CONNECT_TIMEOUT", "timed out connecting to the gateway", request_id)
    if isinstance(exc, requests.Timeout):
        return UnknownOutcome("TIMEOUT", "timed out waiting for the gateway's answer", request_id)
    if isinstance(exc, requests.ConnectionError):
        return UnknownOutcome("CONNECTION_ERROR", f"connection failed: {type(exc).__name__}", request_id)
    if isinstance(exc, requests.RequestException):
        return UnknownOutcome("HTTP_ERROR", f"HTTP client error: {type(exc).__name__}", request_id)
    return None
