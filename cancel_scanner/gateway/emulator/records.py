"""What the emulator records, and how it looks on the wire: payments, refunds, their statuses and JSON.

Plain data and pure functions; the state that holds them is gateway.emulator.ledger.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple
from urllib.parse import urlsplit

BEIJING = timezone(timedelta(hours=8))
USER_RECEIVED_ACCOUNT = "支付用户零钱"

STATUS_PROCESSING, STATUS_SUCCESS, STATUS_CLOSED, STATUS_ABNORMAL = "PROCESSING", "SUCCESS", "CLOSED", "ABNORMAL"
STATUSES = frozenset({STATUS_PROCESSING, STATUS_SUCCESS, STATUS_CLOSED, STATUS_ABNORMAL})

# What WeChat accepts; wider than what our client sends (see gateway.contract).
_OUT_REFUND_NO = re.compile(r"^[0-9A-Za-z_\-|*@]{1,64}$")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

# A refund rule's match: an out_trade_no, out_refund_no or transaction_id, or a predicate on the refund JSON.
Matcher = str | Callable[[dict[str, Any]], bool]


@dataclass
class Payment:
    """One trade. Registered paid (the refund tests' payments) or created NOTPAY (an order's prepay)."""

    out_trade_no: str
    total: int
    transaction_id: str
    state: str = "SUCCESS"  # NOTPAY | USERPAYING | SUCCESS | REFUND | CLOSED
    success_at: float | None = None
    pays_while_closing: bool = False  # the next close is answered 204 while the user's payment goes through

    @property
    def paid(self) -> bool:
        return self.state in ("SUCCESS", "REFUND")


class RecordedRefund(NamedTuple):
    """What a test reads of one recorded refund: WeChat's id for it, its status now, and its fen."""

    refund_id: str
    status: str
    refund: int


@dataclass
class Refund:
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
    # Set by apply-abnormal-refund: the money goes to a bank card now, PROCESSING again from that moment.
    abnormal_applied_at: float | None = None
    channel: str = "ORIGINAL"
    received_account: str = USER_RECEIVED_ACCOUNT


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=BEIJING).isoformat(timespec="seconds")


def digits(prefix: str, length: int) -> str:
    """A WeChat-style number: `prefix`, then random digits up to `length` characters."""
    return prefix + "".join(secrets.choice(string.digits) for _ in range(length - len(prefix)))


def is_out_refund_no(number: str) -> bool:
    return bool(_OUT_REFUND_NO.match(number))


def _is_loopback_or_https(url: str) -> bool:
    parts = urlsplit(url)
    if parts.query:
        return False
    return (parts.scheme == "https" and bool(parts.hostname)) or (
        parts.scheme == "http" and parts.hostname in _LOOPBACK
    )


def invalid_apply_fields(data: Any) -> str | None:
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


def refund_json(refund: Refund) -> dict[str, Any]:
    """The refund object of an answer (apply or query)."""
    data: dict[str, Any] = {
        "refund_id": refund.refund_id,
        "out_refund_no": refund.out_refund_no,
        "transaction_id": refund.transaction_id,
        "out_trade_no": refund.out_trade_no,
        "channel": refund.channel,
        "user_received_account": refund.received_account,
        "create_time": rfc3339(refund.created_at),
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
        data["success_time"] = rfc3339(refund.success_at)
    return data


def matches(rule: Matcher, refund: Refund) -> bool:
    if callable(rule):
        return bool(rule(refund_json(refund)))
    return rule in (refund.out_trade_no, refund.out_refund_no, refund.transaction_id)


def payment_json(payment: Payment, mchid: str, appid: str) -> dict[str, Any]:
    """The trade object of a payment query."""
    data: dict[str, Any] = {
        "appid": appid,
        "mchid": mchid,
        "out_trade_no": payment.out_trade_no,
        "trade_type": "NATIVE",
        "trade_state": payment.state,
        "trade_state_desc": payment.state,
        "attach": "",
        "payer": {"openid": "oEmulatorPayer0000000000000"},
        "amount": {"total": payment.total, "currency": "CNY"},
    }
    if payment.paid:
        data.update(
            transaction_id=payment.transaction_id,
            bank_type="OTHERS",
            success_time=rfc3339(payment.success_at if payment.success_at is not None else 0.0),
        )
        data["amount"].update(payer_total=payment.total, payer_currency="CNY")
    return data
