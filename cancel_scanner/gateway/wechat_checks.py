"""What WeChatPayGateway checks before it calls: its URLs, the numbers it is given, an abnormal
refund's fields (messages name the field, never a bank detail's value), the signature headers."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cancel_scanner.engine.net import is_safe_gateway_url
from cancel_scanner.gateway.contract import (
    ABNORMAL_REFUND_TYPES,
    ABNORMAL_TO_USER,
    BANK_TYPE_PATTERN,
    OUT_REFUND_NO_PATTERN,
    OUT_TRADE_NO_PATTERN,
    REFUND_ID_PATTERN,
    Accepted,
    PaymentState,
    Secret,
)
from cancel_scanner.gateway.notify import HeaderPairs

SIGNATURE_HEADERS = (
    "Wechatpay-Signature",
    "Wechatpay-Timestamp",
    "Wechatpay-Nonce",
    "Wechatpay-Serial",
    "Wechatpay-Signature-Type",
)


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
    _check_base_url(
        f"{parts.scheme}://{parts.netloc}", "wechat.notify_url"
    )  # https, or http on loopback for the sandbox
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


def _canonical_signature_headers(headers: HeaderPairs) -> dict[str, str]:
    # The SDK looks headers up by exact spelling; servers and frameworks hand them over in any case.
    lowered = {str(k).lower(): v for k, v in headers.items()}
    return {name: lowered[name.lower()] for name in SIGNATURE_HEADERS if name.lower() in lowered}
