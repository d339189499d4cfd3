"""WeChat Pay's daily bill: fetch it, check it, read it.

fetch_bill applies for a day's bill, downloads it, checks its SHA1 (the download is the one answer
WeChat does not sign: the hash from the signed apply is the only proof the bytes are WeChat's) and
parses it. It answers a Bill, BillNotReady (try again later: the bill is being made, or the call
failed on the way) or NoBill (no trades that day), and raises BillError when the bill cannot be
trusted or read, or WeChat refused for good: a person must look.

The bill's format (wechatpay-v3-payments.md, "Daily bill"): CSV in UTF-8, perhaps after a BOM; the
detail header, detail rows with every value after a backtick, then the summary header
(总交易单数,...) and its row. Columns are picked by name, never by position: older merchants get
fewer columns under older names. Amounts are yuan with at most two decimals, read as text into
fen: no float ever holds money. Times are Beijing time.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

from loguru import logger

from cancel_scanner.gateway.contract import (
    DEFAULT_BILL_DOWNLOAD_SECONDS,
    DEFAULT_BILL_MAX_BYTES,
    NO_STATEMENT_EXIST,
    BillDownloadFailed,
    BillGateway,
    BillReady,
    ConfigError,
    NotSent,
    Permanent,
    RetryLater,
    UnknownOutcome,
)

BEIJING = timezone(timedelta(hours=8))
SUMMARY_FIRST_COLUMN = "总交易单数"
# The summary's refund totals and the detail column each adds up: a payment line carries 0.00 there,
# so each equals the sum over every line. (The order totals are not checked: whether a refund line's
# order amount counts in them is not documented.)
SUMMARY_REFUND_TOTALS = {"退款总金额": "退款金额", "申请退款总金额": "申请退款金额"}
REFUND_STATE = "REFUND"  # 交易状态 of a refund row
NO_REFUND = frozenset({"", "0"})  # 商户退款单号 of a payment row
# The first name present wins: older bills have fewer columns, under older names.
ORDER_AMOUNT = ("订单金额", "应结订单金额", "总金额")
REFUND_AMOUNT = ("申请退款金额", "退款金额")
REFUND_TIME = ("退款申请时间",)  # the REFUND bill's; the ALL bill dates a refund row by 交易时间
REQUIRED = ("交易时间", "微信订单号", "商户订单号", "交易状态")
REFUND_REQUIRED = ("微信退款单号", "退款状态")
_AMOUNT = re.compile(r"^([0-9]{1,13})(?:\.([0-9]{1,2}))?$")  # ASCII digits: \d would take "１２"
_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$")

_log = logger.bind(component="bill")


class BillError(Exception):
    """The bill cannot be used: BAD_HASH, BAD_FORMAT, BILL_TOTALS_DIFFER, TOO_LARGE, BAD_GZIP, UNTRUSTED_URL, REDIRECT,
    or WeChat's own code when it refused for good (PARAM_ERROR, SIGN_ERROR...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BillRefund:
    out_trade_no: str
    out_refund_no: str
    refund_fen: int  # 申请退款金额 (退款金额 in older bills)
    status: str  # 退款状态 as the bill writes it: SUCCESS, PROCESSING, CLOSED, ABNORMAL (older: REFUNDCLOSE, CHANGE)
    wx_refund_id: str
    transaction_id: str
    at: datetime  # aware, UTC: when WeChat accepted the refund (退款申请时间, else 交易时间)


@dataclass(frozen=True)
class BillPayment:
    out_trade_no: str
    transaction_id: str
    total_fen: int  # 订单金额 (应结订单金额, 总金额 in older bills)
    status: str  # 交易状态: SUCCESS for a payment; others (REVOKED...) as written
    at: datetime  # aware, UTC


@dataclass(frozen=True)
class Bill:
    bill_date: date
    refunds: tuple[BillRefund, ...]
    payments: tuple[BillPayment, ...]
    rows: int  # detail rows read (refunds + payments)


@dataclass(frozen=True)
class BillNotReady:
    """No bill now, maybe later: STATEMENT_CREATING, or the apply or the download failed on the way."""

    code: str
    message: str


@dataclass(frozen=True)
class NoBill:
    """WeChat has no bill for the day (NO_STATEMENT_EXIST): the merchant had no trades."""

    bill_date: date
    code: str = NO_STATEMENT_EXIST


# -- fetching -----------------------------------------------------------------------------------


def fetch_bill(
    gateway: BillGateway,
    bill_date: date,
    *,
    bill_type: str = "ALL",
    max_bytes: int = DEFAULT_BILL_MAX_BYTES,
    max_seconds: float = DEFAULT_BILL_DOWNLOAD_SECONDS,
) -> Bill | BillNotReady | NoBill:
    """Apply for, download, check and parse the day's bill (see the module docstring)."""
    log = _log.bind(action="fetch_bill", bill_date=str(bill_date), bill_type=bill_type)
    applied = gateway.trade_bill(bill_date, bill_type=bill_type)
    if not isinstance(applied, BillReady):
        return _not_a_bill(applied, bill_date)
    try:
        data = gateway.download_bill(applied.download_url, max_bytes=max_bytes, max_seconds=max_seconds)
    except BillDownloadFailed as failed:
        outcome = _not_a_bill(failed.result, bill_date)
        if isinstance(outcome, NoBill):  # not an answer a download gives; never read it as "no trades"
            raise BillError(failed.result.code, failed.result.message) from None
        return outcome
    check_sha1(data, applied.hash_value)
    bill = parse_bill(data, bill_date)
    log.bind(rows=bill.rows, refunds=len(bill.refunds), payments=len(bill.payments), bytes=len(data)).info(
        "bill of {} read: {} rows", bill_date, bill.rows
    )
    return bill


def _not_a_bill(result: object, bill_date: date) -> BillNotReady | NoBill:
    if isinstance(result, Permanent) and result.code == NO_STATEMENT_EXIST:
        return NoBill(bill_date)
    if isinstance(result, (RetryLater, UnknownOutcome, NotSent)):
        return BillNotReady(result.code, result.message)
    if isinstance(result, (Permanent, ConfigError)):
        raise BillError(result.code, result.message)
    raise TypeError(f"not a gateway answer: {result!r}")


def check_sha1(data: bytes, expected_hex: str) -> None:
    """BillError BAD_HASH unless ``data`` (the decompressed bill) hashes to ``expected_hex``."""
    actual = hashlib.sha1(data).hexdigest()
    if not hmac.compare_digest(actual, str(expected_hex).strip().lower()):
        raise BillError("BAD_HASH", f"the bill's SHA1 is {actual}, WeChat's answer said {expected_hex}")


# -- parsing ------------------------------------------------------------------------------------


def parse_bill(data: bytes, bill_date: date) -> Bill:
    """Read a decompressed bill; BillError BAD_FORMAT for anything that is not WeChat's format.

    One pass, line by line (the csv module reads lazily from the bytes): about a second for a
    hundred thousand rows.
    """
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="strict", newline="")
    lines = csv.reader(text, strict=True)
    refunds: list[BillRefund] = []
    payments: list[BillPayment] = []
    summary: list[list[str]] = []  # its header, then its row
    try:
        rows = (row for row in lines if row and (len(row) > 1 or row[0].strip()))  # blank lines are nothing
        header = next(rows, None)
        if header is None:
            raise _RowError("the bill is empty")
        reader = _RowReader([_clean(name) for name in header])
        for row in rows:
            if summary:
                summary.append(row)
                continue
            if _clean(row[0]) == SUMMARY_FIRST_COLUMN:
                summary.append(row)
                continue
            entry = reader.read(row)
            if isinstance(entry, BillRefund):
                refunds.append(entry)
            else:
                payments.append(entry)
        _check_summary(summary)
        _check_totals(summary, len(refunds) + len(payments), reader.totals)
    except BillTotalsDiffer as exc:
        raise BillError("BILL_TOTALS_DIFFER", f"the bill does not add up: {exc}") from None
    except _RowError as exc:
        where = f"line {lines.line_num}: " if lines.line_num else ""
        raise BillError("BAD_FORMAT", where + str(exc)) from None
    except UnicodeDecodeError:
        raise BillError("BAD_FORMAT", "the bill is not UTF-8") from None
    except csv.Error as exc:
        raise BillError("BAD_FORMAT", f"the bill is not CSV: {exc}") from None
    return Bill(
        bill_date=bill_date, refunds=tuple(refunds), payments=tuple(payments), rows=len(refunds) + len(payments)
    )


class _RowError(Exception):
    """What is wrong with the line the reader is on; parse_bill names the line."""


def _check_summary(summary: list[list[str]]) -> None:
    # Its figures are not read (the SHA1 vouches for the whole file), but a bill without its
    # summary was cut short, and anything after it is not WeChat's.
    if not summary:
        raise _RowError("no summary (总交易单数...): the bill is cut short")
    if len(summary) == 1:
        raise _RowError("the summary header has no row under it")
    if len(summary) > 2:
        raise _RowError("text after the summary")
    if not summary[1][0].startswith("`"):
        raise _RowError("the summary row's values must start with a backtick")


def _check_totals(summary: list[list[str]], lines: int, totals: dict[str, int]) -> None:
    """The bill is trusted only as far as it adds up: its summary's count and refund totals must be its lines'."""
    said = {_clean(name): _clean(value) for name, value in zip(summary[0], summary[1])}
    if SUMMARY_FIRST_COLUMN in said and said[SUMMARY_FIRST_COLUMN] != str(lines):
        raise BillTotalsDiffer(f"its summary counts {said[SUMMARY_FIRST_COLUMN]} trades, its lines are {lines}")
    for name, column in SUMMARY_REFUND_TOTALS.items():
        if name in said and column in totals and _fen(said[name]) != totals[column]:
            raise BillTotalsDiffer(
                f"its summary's {name} is {said[name]} yuan, its lines' {column} add up to"
                f" {totals[column] // 100}.{totals[column] % 100:02d}"
            )


class BillTotalsDiffer(Exception):
    """The summary line does not add up to the bill's own lines: the day fails with this reason."""


def _clean(value: str) -> str:
    # Every value starts with a backtick (so spreadsheets keep long numbers as text); headers do not.
    return value[1:].strip() if value[:1] == "`" else value.strip()


class _RowReader:
    """Turns detail rows into BillRefund / BillPayment, with the columns found by name in the header."""

    def __init__(self, header: list[str]) -> None:
        index = {name: i for i, name in reversed(list(enumerate(header)))}  # the first of a repeated name
        missing = [name for name in REQUIRED if name not in index]
        if missing:
            raise _RowError(f"the detail header lacks {', '.join(missing)}")
        self.width = len(header)
        self.time, self.transaction, self.trade, self.state = (index[name] for name in REQUIRED)
        self.order_amount = _first(index, ORDER_AMOUNT)
        self.refund_no = index.get("商户退款单号")
        self.refund_amount = _first(index, REFUND_AMOUNT)
        self.refund_time = _first(index, REFUND_TIME)
        self.refund_id = index.get("微信退款单号")
        self.refund_state = index.get("退款状态")
        self.refund_columns_missing = [name for name in ("商户退款单号", *REFUND_REQUIRED) if name not in index]
        if self.refund_amount is None:
            self.refund_columns_missing.append("/".join(REFUND_AMOUNT))
        self._summed = {column: index[column] for column in SUMMARY_REFUND_TOTALS.values() if column in index}
        self.totals = {column: 0 for column in self._summed}  # fen, over every line read

    def read(self, row: list[str]) -> BillRefund | BillPayment:
        if len(row) != self.width:
            raise _RowError(f"{len(row)} values under a header of {self.width}")
        if row[self.time][:1] != "`":
            raise _RowError("detail values must start with a backtick")
        for column, i in self._summed.items():
            if _clean(row[i]):
                self.totals[column] += _fen(row[i])
        state = _clean(row[self.state])
        refund_no = _clean(row[self.refund_no]) if self.refund_no is not None else ""
        if refund_no not in NO_REFUND or state == REFUND_STATE:
            return self._refund(row, refund_no)
        if self.order_amount is None:
            raise _RowError(f"a payment, but the header has none of {', '.join(ORDER_AMOUNT)}")
        return BillPayment(
            out_trade_no=_clean(row[self.trade]),
            transaction_id=_clean(row[self.transaction]),
            total_fen=_fen(row[self.order_amount]),
            status=state,
            at=_utc(row[self.time]),
        )

    def _refund(self, row: list[str], refund_no: str) -> BillRefund:
        if self.refund_columns_missing:
            raise _RowError(f"a refund, but the header lacks {', '.join(self.refund_columns_missing)}")
        if refund_no in NO_REFUND:
            raise _RowError("a REFUND row without 商户退款单号")
        assert self.refund_amount is not None and self.refund_id is not None and self.refund_state is not None
        accepted = row[self.refund_time] if self.refund_time is not None else ""
        return BillRefund(
            out_trade_no=_clean(row[self.trade]),
            out_refund_no=refund_no,
            refund_fen=_fen(row[self.refund_amount]),
            status=_clean(row[self.refund_state]),
            wx_refund_id=_clean(row[self.refund_id]),
            transaction_id=_clean(row[self.transaction]),
            at=_utc(accepted if _clean(accepted) else row[self.time]),
        )


def _first(index: dict[str, int], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in index:
            return index[name]
    return None


def to_fen(value: str) -> int:
    """'`12.30' -> 1230, exactly; BillError BAD_FORMAT for anything but yuan with up to two decimals."""
    try:
        return _fen(value)
    except _RowError as exc:
        raise BillError("BAD_FORMAT", str(exc)) from None


def _fen(value: str) -> int:
    match = _AMOUNT.match(_clean(value))
    if match is None:
        raise _RowError(f"{value!r} is not an amount in yuan with at most two decimals")
    whole, cents = match.groups()
    return int(whole) * 100 + (int(cents) * (10 if len(cents) == 1 else 1) if cents else 0)


def _utc(value: str) -> datetime:
    text = _clean(value)
    if not _TIME.match(text):
        raise _RowError(f"{value!r} is not a time YYYY-MM-DD HH:MM:SS")
    try:
        return datetime.fromisoformat(text + "+08:00").astimezone(UTC)  # the bill's times are Beijing time
    except ValueError:
        raise _RowError(f"{value!r} is not a time") from None
