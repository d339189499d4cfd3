"""The refund gateway contract: what the stages send, and the six outcomes they get back.

Stages depend on this module only, never on the WeChat Pay SDK, so the live
client, the sandbox and any test double are interchangeable.

Amounts are integers in fen. Times are naive UTC datetimes, like every
DATETIME column in the schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol, TypeAlias

from cancel_scanner.engine.outcome import Coded, clip  # one rule for a code, a message and a VARCHAR(255)

# WeChat allows any 64 bytes, but the SDK signs the path unencoded while
# `requests` percent-encodes characters such as `|`: the two would disagree and
# every query of such a number would fail with SIGN_ERROR. So we allow only
# characters that need no encoding.
OUT_REFUND_NO_PATTERN = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
OUT_TRADE_NO_MAX_CHARS = 32
# WeChat's out_trade_no: 6..32 of [0-9A-Za-z_-|*]; it goes into a signed path, so nothing else.
OUT_TRADE_NO_PATTERN = re.compile(r"^[0-9A-Za-z_\-|*]{1,32}$")
OUT_TRADE_NO_MIN_CHARS = 6
REASON_MAX_BYTES = 80


def out_trade_no_problem(out_trade_no: str | None) -> str | None:
    """Why WeChat Pay would refuse this order number as ``out_trade_no`` (6 to 32 of [0-9A-Za-z_-|*]), or None."""
    if not out_trade_no:
        return "the order has no order_no"
    if not OUT_TRADE_NO_MIN_CHARS <= len(out_trade_no) <= OUT_TRADE_NO_MAX_CHARS:
        return f"its order_no has {len(out_trade_no)} characters; WeChat Pay takes {OUT_TRADE_NO_MIN_CHARS} to {OUT_TRADE_NO_MAX_CHARS}"
    if not OUT_TRADE_NO_PATTERN.match(out_trade_no):
        return "its order_no has characters WeChat Pay refuses (it takes only letters, digits and _ - | *)"
    return None


STATUS_PROCESSING = "PROCESSING"
STATUS_SUCCESS = "SUCCESS"
STATUS_CLOSED = "CLOSED"
STATUS_ABNORMAL = "ABNORMAL"
REFUND_STATUSES = frozenset({STATUS_PROCESSING, STATUS_SUCCESS, STATUS_CLOSED, STATUS_ABNORMAL})
FINAL_STATUSES = frozenset({STATUS_SUCCESS, STATUS_CLOSED})


def _is_fen(value: object) -> bool:
    # bool is an int subclass; True fen is a bug, not one fen.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RefundRequest:
    """One refund as the submit stage sends it; replays must send it unchanged."""

    out_refund_no: str
    out_trade_no: str
    refund_amount: int
    total_amount: int
    transaction_id: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.out_refund_no, str) or not OUT_REFUND_NO_PATTERN.match(self.out_refund_no):
            raise ValueError(f"out_refund_no must match {OUT_REFUND_NO_PATTERN.pattern}: {self.out_refund_no!r}")
        if not self.out_trade_no or len(self.out_trade_no) > OUT_TRADE_NO_MAX_CHARS:
            raise ValueError(f"out_trade_no must be 1..{OUT_TRADE_NO_MAX_CHARS} characters: {self.out_trade_no!r}")
        if not _is_fen(self.refund_amount) or self.refund_amount <= 0:
            raise ValueError(f"refund_amount must be a positive number of fen: {self.refund_amount!r}")
        if not _is_fen(self.total_amount) or self.total_amount <= 0:
            raise ValueError(f"total_amount must be a positive number of fen: {self.total_amount!r}")
        if self.refund_amount > self.total_amount:
            raise ValueError(f"refund_amount {self.refund_amount} exceeds total_amount {self.total_amount}")
        if self.reason is not None and len(self.reason.encode("utf-8")) > REASON_MAX_BYTES:
            raise ValueError(f"reason must be at most {REASON_MAX_BYTES} bytes of UTF-8")


def parse_rfc3339(text: str) -> datetime:
    """'2024-05-01T10:00:00+08:00' -> naive UTC datetime(2024, 5, 1, 2, 0)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        # Guessing a zone would shift money timestamps by hours without anyone noticing.
        raise ValueError(f"timestamp without an offset: {text!r}")
    return parsed.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Refund:
    """The refund object that apply, query and the notification all carry."""

    refund_id: str
    out_refund_no: str
    out_trade_no: str
    transaction_id: str
    status: str
    success_time: datetime | None
    create_time: datetime | None
    refund_amount: int
    total_amount: int
    user_received_account: str
    channel: str

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Refund:
        """Build from WeChat's JSON; raises ValueError when a field the stages rely on is missing or malformed."""
        try:
            amount = data["amount"]
            refund_amount, total_amount = amount["refund"], amount["total"]
            refund_id, out_refund_no, status = data["refund_id"], data["out_refund_no"], data["status"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"refund object lacks {exc}") from None
        if status not in REFUND_STATUSES:
            raise ValueError(f"unknown refund status {status!r}")
        if not (_is_fen(refund_amount) and _is_fen(total_amount)):
            raise ValueError("refund amounts are not integers")
        success_time = data.get("success_time")
        create_time = data.get("create_time")
        return cls(
            refund_id=str(refund_id),
            out_refund_no=str(out_refund_no),
            out_trade_no=str(data.get("out_trade_no") or ""),
            transaction_id=str(data.get("transaction_id") or ""),
            status=status,
            success_time=parse_rfc3339(success_time) if success_time else None,
            create_time=parse_rfc3339(create_time) if create_time else None,
            refund_amount=refund_amount,
            total_amount=total_amount,
            user_received_account=str(data.get("user_received_account") or ""),
            channel=str(data.get("channel") or ""),
        )


@dataclass(frozen=True)
class Accepted:
    """WeChat answered with a verified refund object (apply: accepted; query: its current state)."""

    refund: Refund
    request_id: str | None = None

    def describe(self) -> str:
        return clip(f"{self.refund.status}: refund_id {self.refund.refund_id}")


@dataclass(frozen=True)
class _Coded(Coded):
    """An answer that is not a refund object: WeChat's error code and message."""

    request_id: str | None = None


@dataclass(frozen=True)
class UnknownOutcome(_Coded):
    """The refund may or may not exist. Retry with the SAME out_refund_no and body; never count as success."""


@dataclass(frozen=True)
class RetryLater(_Coded):
    """WeChat refused for now (NOT_ENOUGH, RESOURCE_NOT_EXISTS...); no money moved. Retry the same number later.

    give_up_after: how many such answers in a row make it permanent; None means
    keep retrying until the stage's own max_attempts.
    """

    give_up_after: int | None = None


@dataclass(frozen=True)
class Permanent(_Coded):
    """WeChat refused this refund for good; no money moved. An operator must look at the row."""


@dataclass(frozen=True)
class ConfigError(_Coded):
    """Our side is misconfigured (keys, serial, mchid, clock skew): permanent for the row, and alert loudly."""


@dataclass(frozen=True)
class NotSent(_Coded):
    """The call was never sent: nothing reached WeChat (its deadline could not be met); not an attempt.

    Safe to retry with the same number whenever the caller likes; it says
    nothing about the refund and should not count towards max_attempts.
    """


GatewayResult: TypeAlias = Accepted | UnknownOutcome | RetryLater | Permanent | ConfigError | NotSent


# --- payments: query and close, for orders that were never (known to be) paid -------------------

TRADE_STATES = frozenset({"SUCCESS", "REFUND", "NOTPAY", "CLOSED", "REVOKED", "USERPAYING", "PAYERROR"})
PAID_STATES = frozenset({"SUCCESS", "REFUND"})  # the user's money reached the merchant
CLOSABLE_STATES = frozenset({"NOTPAY", "REVOKED", "PAYERROR"})  # not paid; closing is harmless
TRADE_NOT_FOUND_CODES = frozenset({"ORDER_NOT_EXIST", "ORDERNOTEXIST"})  # WeChat never saw the order
PAYMENT_CURRENCY = "CNY"  # every amount here is fen of yuan
# A signed trade object about another merchant's, another app's or another currency's money: for a person.
FOREIGN_PAYMENT = "FOREIGN_PAYMENT"


@dataclass(frozen=True)
class Payment:
    """The payment (trade) object a payment query answers."""

    out_trade_no: str
    trade_state: str
    transaction_id: str
    success_time: datetime | None
    total: int | None
    # Whose trade it is, and in what money: checked against ours before anything is believed.
    mchid: str = ""
    appid: str = ""
    currency: str | None = None

    @property
    def paid(self) -> bool:
        return self.trade_state in PAID_STATES

    def foreign(self, mchid: str, appid: str) -> str | None:
        """Why this trade object is not about our merchant's money in yuan, or None."""
        if self.mchid != mchid:
            return f"the answer names merchant {self.mchid or 'none'!r}, not ours"
        if self.appid != appid:
            return f"the answer names app {self.appid or 'none'!r}, not ours"
        if self.currency not in (None, PAYMENT_CURRENCY):
            return f"the answer is in {self.currency!r}, not {PAYMENT_CURRENCY}"
        return None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Payment:
        """Raises ValueError when the fields a paid order is booked from are missing or malformed."""
        try:
            out_trade_no, state = data["out_trade_no"], data["trade_state"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"payment object lacks {exc}") from None
        if state not in TRADE_STATES:
            raise ValueError(f"unknown trade_state {state!r}")
        amount = data.get("amount")
        if not isinstance(amount, Mapping):
            amount = {}
        total = amount.get("total")
        success_time = data.get("success_time")
        payment = cls(
            out_trade_no=str(out_trade_no),
            trade_state=state,
            transaction_id=str(data.get("transaction_id") or ""),
            success_time=parse_rfc3339(success_time) if success_time else None,
            total=total if _is_fen(total) else None,
            mchid=str(data.get("mchid") or ""),
            appid=str(data.get("appid") or ""),
            currency=str(amount["currency"]) if amount.get("currency") is not None else None,
        )
        if payment.paid and not (payment.transaction_id and payment.success_time and payment.total):
            # Booking a payment needs all three: without them the answer proves nothing we can write.
            raise ValueError("a paid trade without transaction_id, success_time or amount.total")
        return payment


@dataclass(frozen=True)
class PaymentState:
    """WeChat answered a payment query with a verified trade object."""

    payment: Payment
    request_id: str | None = None

    def describe(self) -> str:
        return clip(f"{self.payment.trade_state}: trade {self.payment.out_trade_no}")


@dataclass(frozen=True)
class CloseSent:
    """A close was answered 204 (or ORDER_CLOSED). Never proof: only a query after it says CLOSED."""

    code: str = "CLOSE_ANSWERED"
    request_id: str | None = None

    def describe(self) -> str:
        return "close answered; the trade is confirmed closed only by the query after it"


@dataclass(frozen=True)
class NoSuchTrade:
    """A close answered ORDER_NOT_EXIST under a signature that verifies: WeChat, not a proxy, says it
    never saw the trade. The one proof, besides CLOSED, that an order can be cancelled unpaid."""

    code: str = "ORDER_NOT_EXIST"
    request_id: str | None = None

    def describe(self) -> str:
        return "close answered, signed: WeChat never saw the trade"


PaymentResult: TypeAlias = (
    PaymentState | CloseSent | NoSuchTrade | UnknownOutcome | RetryLater | Permanent | ConfigError | NotSent
)


class RefundGateway(Protocol):
    """What the submit and poll stages call. Implementations never raise for a gateway answer or a network error.

    deadline: called (possibly several times: before pacing, and again just
    before the bytes leave) for the time.monotonic() instant by which the
    whole call (pacing wait, connect, request, the complete answer) must be
    over. A call that cannot start early enough is NotSent; one whose answer
    is not complete by then is UnknownOutcome("TIMEOUT"). None: the client's
    own timeouts only.
    """

    def apply(self, req: RefundRequest, *, deadline: Callable[[], float] | None = None) -> GatewayResult: ...

    def query(self, out_refund_no: str, *, deadline: Callable[[], float] | None = None) -> GatewayResult: ...

    def calls_within(self, endpoint: str, seconds: float) -> int | None:
        """How many calls of `endpoint` ("apply", "query", "pay_query", "pay_close") the client's pacer
        can still start within `seconds` from now, counting slots other threads reserved; None when unpaced."""
        ...

    def close(self) -> None: ...


class PaymentGateway(Protocol):
    """What the close_unpaid stage calls; the same deadline rule and never a raise for an answer."""

    def query_payment(self, out_trade_no: str, *, deadline: Callable[[], float] | None = None) -> PaymentResult: ...

    def close_payment(self, out_trade_no: str, *, deadline: Callable[[], float] | None = None) -> PaymentResult: ...


# --- abnormal refunds: an ABNORMAL refund sent on to a bank card -----------------------------------

ABNORMAL_TO_MERCHANT = "MERCHANT_BANK_CARD"  # back to the merchant's own bank account; needs nothing else
ABNORMAL_TO_USER = "USER_BANK_CARD"  # to the user's debit card: bank_type, bank_account and real_name
ABNORMAL_REFUND_TYPES = frozenset({ABNORMAL_TO_MERCHANT, ABNORMAL_TO_USER})
# WeChat's refund_id goes into a signed path, like out_refund_no: only characters that need no encoding.
REFUND_ID_PATTERN = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
BANK_TYPE_PATTERN = re.compile(r"^[A-Z0-9_]{1,32}$")  # WeChat's bank codes: ICBC_DEBIT, CMB_DEBIT, ...


class Secret:
    """A value that must never be shown: a user's bank account number or name.

    ``str()``, ``repr()`` and formatting all give ``***``, so a log line, an exception message or a
    traceback that names it shows nothing; only ``reveal()`` gives the text, and only the gateway
    calls it, as the SDK encrypts it. Equality is deliberately identity: comparing secrets is not a
    thing code should do by accident.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds text")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret(***)"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __reduce__(self):  # pickling would carry the text to wherever the pickle goes
        raise TypeError("a Secret cannot be pickled")


class AbnormalRefundGateway(Protocol):
    """What `cancel-scanner abnormal-refund` calls. The same deadline rule, never a raise for an answer.

    Accepted carries the refund object WeChat answers (status back to PROCESSING, channel
    OTHER_BANKCARD); Permanent is WeChat's refusal (e.g. INVALID_REQUEST: the refund is not ABNORMAL).
    """

    def abnormal_refund(
        self,
        refund_id: str,
        out_refund_no: str,
        *,
        to: str,
        bank_type: str | None = None,
        bank_account: Secret | None = None,
        real_name: Secret | None = None,
        deadline: Callable[[], float] | None = None,
    ) -> GatewayResult: ...


# --- the daily bill: what WeChat says it holds of a day, for reconciliation ------------------------

BILL_TYPES = frozenset({"ALL", "SUCCESS", "REFUND"})
STATEMENT_CREATING = "STATEMENT_CREATING"  # the day's bill is being made (before ~10:00 Beijing time): RetryLater
NO_STATEMENT_EXIST = "NO_STATEMENT_EXIST"  # no trades that day, so no bill: a Permanent with this code
DEFAULT_BILL_MAX_BYTES = 200 * 1024 * 1024  # decompressed; a day of ~1 million rows at ~200 bytes a row
DEFAULT_BILL_DOWNLOAD_SECONDS = 300.0  # the whole download, connect to last byte; the URL is valid ~5 minutes anyway
_SHA1_HEX = re.compile(r"^[0-9A-Fa-f]{40}$")


@dataclass(frozen=True)
class BillReady:
    """WeChat has the day's bill: its SHA1 (of the decompressed bytes, lower-case hex) and where to get it
    (valid about 5 minutes; the download itself is not signed, so the SHA1 is the only proof)."""

    hash_value: str
    download_url: str
    request_id: str | None = None

    def describe(self) -> str:
        return clip(f"bill ready: SHA1 {self.hash_value}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], request_id: str | None = None) -> BillReady:
        """Raises ValueError unless the answer names a SHA1 hash and a download URL."""
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        hash_type, hash_value, url = data.get("hash_type"), data.get("hash_value"), data.get("download_url")
        if hash_type != "SHA1":
            raise ValueError(f"hash_type must be SHA1: {hash_type!r}")
        if not isinstance(hash_value, str) or not _SHA1_HEX.match(hash_value):
            raise ValueError("hash_value is not 40 hex digits")
        if not isinstance(url, str) or not url:
            raise ValueError("no download_url")
        return cls(hash_value.lower(), url, request_id)


# NO_STATEMENT_EXIST is a Permanent (WeChat's plain "no such bill"; monitoring does not count a
# Permanent as a failure) rather than a class of its own: operations.bill.fetch_bill, the one
# caller, turns it into NoBill.
BillResult: TypeAlias = BillReady | UnknownOutcome | RetryLater | Permanent | ConfigError | NotSent


class BillDownloadFailed(Exception):
    """download_bill got no bill: ``result`` says why, in the contract's classes.

    UnknownOutcome, RetryLater and NotSent are worth another try (a new trade_bill first: the URL
    expires); Permanent and ConfigError are not (codes of our own: UNTRUSTED_URL, the URL is not on
    the gateway's host and was never requested; TOO_LARGE, over max_bytes on the wire or
    decompressed; BAD_GZIP; REDIRECT, never followed).
    """

    def __init__(self, result: UnknownOutcome | RetryLater | Permanent | ConfigError | NotSent) -> None:
        super().__init__(result.describe())
        self.result = result


class BillGateway(Protocol):
    """What operations.bill.fetch_bill calls. trade_bill never raises for an answer; download_bill
    raises BillDownloadFailed instead of returning anything but the bill's bytes."""

    def trade_bill(
        self, bill_date: date, *, bill_type: str = "ALL", deadline: Callable[[], float] | None = None
    ) -> BillResult: ...

    def download_bill(
        self,
        url: str,
        *,
        max_bytes: int = DEFAULT_BILL_MAX_BYTES,
        max_seconds: float = DEFAULT_BILL_DOWNLOAD_SECONDS,
        deadline: Callable[[], float] | None = None,
    ) -> bytes: ...
