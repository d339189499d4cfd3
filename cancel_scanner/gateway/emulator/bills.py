"""The emulator's daily bill: apply (GET /v3/bill/tradebill), download, and the bill itself.

A mixin of gateway.emulator.Emulator, on its one lock, reading the ledger's payments and refunds
(each carries when it happened: a payment's `success_at`, a refund's `created_at`, WeChat's
acceptance). A day is a Beijing-time day. The bill is WeChat's CSV: UTF-8 with a BOM, the detail
header, one row per trade with every value after a backtick, the summary header and its row;
amounts in yuan with two decimals. The ALL bill has a row per payment made that day (交易状态
SUCCESS, 商户退款单号 0) and a row per refund accepted that day (交易状态 REFUND), its 退款状态 as it
stood when the bill was made.

What a test writer should know:

* A day's bill is made `bill_ready_after` seconds (default 10 h) after the day ended, on `clock`;
  before that (and for today) the apply answers 400 STATEMENT_CREATING, as does any day
  `statement_creating(day)` named until `statement_creating(day, False)`. `bill_ready_after =
  None` makes every day's bill at once, today's too (the sandbox's trades of the moment).
* A bill is made once, on the first apply at or after it is ready, and served unchanged from then
  on, as WeChat's is (`forget_bills()` makes them anew). A bill of a day not over yet is never kept.
* A day without a payment or a refund answers 400 NO_STATEMENT_EXIST; a day with trades but none
  of the type asked for (REFUND, SUCCESS) is a bill without detail rows.
* Older than three months, or later than today: 400 PARAM_ERROR (the facts sheet names no code).
* `bill_columns` (a tuple of column names; None: WeChat's current ones for each bill type)
  serves another column set, e.g. LEGACY_ALL_COLUMNS, to prove the client picks columns by name.
* The download URL points at `bill_download_base` (None: the emulator itself), with a random
  token valid DOWNLOAD_VALID_SECONDS on `clock`; after that 404 RESOURCE_NOT_EXISTS. The
  download is authenticated like every call, answered unsigned, gzip when the apply asked.
* A download asks the emulator's fault hooks (gateway.emulator.hooks) for a strike; the test-only
  ones (testsupport/bill_faults.py, through `Emulator.spoil_next_download`) spoil it: a bad hash, a
  trickle, a huge body, a gzip bomb, a redirect, a 500, a dropped connection. No QPS limit applies
  to bill calls, and the API calls' faults leave them alone.
* `bill_counts`: "applied", "downloaded", "creating", "no_statement", "refused" and "spoiled/<kind>".
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import secrets
import threading
from calendar import monthrange
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from cancel_scanner.gateway.emulator.hooks import FaultHooks
from cancel_scanner.gateway.emulator.records import BEIJING, STATUS_SUCCESS, Payment, Refund
from cancel_scanner.gateway.emulator.replies import FileReply, Reply
from cancel_scanner.gateway.emulator.replies import error_reply as _error
from cancel_scanner.gateway.keys import KeyMaterial

BILL_PATH = "/v3/bill/tradebill"
DOWNLOAD_PATH = "/v3/billdownload/file"
BILL_CALLS = frozenset({"trade_bill", "bill_download"})
BILL_READY_AFTER_SECONDS = 10 * 3600  # "yesterday's bill exists after about 10:00"
DOWNLOAD_VALID_SECONDS = 300
BILL_MONTHS = 3
BILL_TYPES = ("ALL", "SUCCESS", "REFUND")
BOM = "\ufeff"
OPENID = "oEmulatorPayer0000000000000"
# Shops name goods with commas and quotes: the CSV must quote them, and a reader must not split them.
GOODS_NAME = '模拟商品，规格：大号,红色 "限量"'
FEE_RATE_PER_MILLE = 6  # 0.60%

ALL_COLUMNS = tuple(
    "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
    "应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,"
    "手续费,费率,订单金额,申请退款金额,费率备注".split(",")
)
REFUND_COLUMNS = tuple(
    "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
    "应结订单金额,代金券金额,退款申请时间,退款成功时间,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,"
    "商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注".split(",")
)
_REFUND_ONLY = frozenset(
    {"微信退款单号", "商户退款单号", "退款金额", "充值券退款金额", "退款类型", "退款状态", "申请退款金额"}
)
SUCCESS_COLUMNS = tuple(c for c in ALL_COLUMNS if c not in _REFUND_ONLY)
# What older merchants still get: no 订单金额, 申请退款金额 or 费率备注.
LEGACY_ALL_COLUMNS = ALL_COLUMNS[: ALL_COLUMNS.index("费率") + 1]
KNOWN_COLUMNS = frozenset(ALL_COLUMNS) | frozenset(REFUND_COLUMNS)
# Each summary field and the detail column it adds up (None: it counts the rows).
SUMMARY = (
    ("总交易单数", None),
    ("应结订单总金额", "应结订单金额"),
    ("退款总金额", "退款金额"),
    ("充值券退款总金额", "充值券退款金额"),
    ("手续费总金额", "手续费"),
    ("订单总金额", "订单金额"),
    ("申请退款总金额", "申请退款金额"),
)
_AMOUNT_COLUMNS = frozenset(column for _, column in SUMMARY if column)
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def beijing_day(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, BEIJING).date()


def day_start(day: date) -> float:
    """The epoch second a Beijing day begins."""
    return datetime.combine(day, time(0), BEIJING).timestamp()


def months_before(day: date, months: int) -> date:
    month = day.month - months
    year = day.year + (month - 1) // 12
    month = (month - 1) % 12 + 1
    return date(year, month, min(day.day, monthrange(year, month)[1]))


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def _fee(fen: int) -> int:
    return (fen * FEE_RATE_PER_MILLE + 500) // 1000  # rounded half up, to the fen


@dataclass
class _Download:
    bill: bytes
    gzip: bool
    expires_at: float


def render_bill(rows: list[dict[str, str]], columns: tuple[str, ...], *, extra: Sequence[dict[str, str]] = ()) -> bytes:
    """WeChat's CSV of `rows` (column -> value, values without their backtick) under `columns`;
    `extra` lines are written after them but left out of the summary (a bill that does not add up)."""
    text = io.StringIO()
    text.write(BOM)
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(columns)
    for row in [*rows, *extra]:
        writer.writerow(["`" + row.get(column, "") for column in columns])
    summary = [(name, source) for name, source in SUMMARY if source is None or source in columns]
    writer.writerow([name for name, _ in summary])
    totals = []
    for _, source in summary:
        if source is None:
            totals.append(str(len(rows)))
        else:
            totals.append(yuan(sum(_fen(row.get(source, "0.00")) for row in rows)))
    writer.writerow(["`" + value for value in totals])
    return text.getvalue().encode("utf-8")


def _fen(text: str) -> int:
    whole, _, cents = text.partition(".")
    return int(whole or 0) * 100 + int((cents or "0").ljust(2, "0"))


class BillDesk:
    # Provided by the Emulator (and its ledger):
    keys: KeyMaterial
    _lock: threading.RLock
    _changed: threading.Condition
    _stopping: threading.Event
    _clock: Callable[[], float]
    _payments: dict[str, Payment]
    _refunds: dict[str, Refund]
    _advance: Callable[[Refund, float], bool]
    faults: FaultHooks
    if TYPE_CHECKING:

        @property
        def base_url(self) -> str: ...  # the Emulator's, read-only

    def _init_bills(self) -> None:
        self.bill_ready_after: float | None = BILL_READY_AFTER_SECONDS
        self.bill_download_base: str | None = None  # where download URLs point; None: this emulator
        self.bill_counts: Counter[str] = Counter()
        self._bill_columns: tuple[str, ...] | None = None
        self._creating: set[date] = set()
        self._made: dict[tuple[date, str, tuple[str, ...] | None], bytes] = {}
        self._downloads: dict[str, _Download] = {}
        # A bill made from now on repeats its first refund line: "summary_too" (the summary counts
        # it: the bill adds up), "line_only" (the summary does not: it does not add up), or None.
        self.duplicate_refund_line: str | None = None

    # -- test controls -----------------------------------------------------------------------

    @property
    def bill_columns(self) -> tuple[str, ...] | None:
        return self._bill_columns

    @bill_columns.setter
    def bill_columns(self, columns: tuple[str, ...] | None) -> None:
        if columns is not None:
            columns = tuple(columns)
            unknown = [c for c in columns if c not in KNOWN_COLUMNS]
            if unknown or len(set(columns)) != len(columns) or not columns:
                raise ValueError(
                    f"bill_columns must be distinct names among WeChat's bill columns: {unknown or columns}"
                )
        with self._lock:
            self._bill_columns = columns

    def statement_creating(self, day: date, creating: bool = True) -> None:
        """Answer STATEMENT_CREATING for this day's bill until called again with creating=False."""
        with self._lock:
            (self._creating.add if creating else self._creating.discard)(day)

    def forget_bills(self) -> None:
        """Drop the bills already made: the next apply makes them again from what is recorded now."""
        with self._lock:
            self._made.clear()

    def bill_bytes(self, day: date, bill_type: str = "ALL") -> bytes | None:
        """The bill an apply would serve now (made anew, kept nowhere), or None for a day without trades."""
        with self._changed:
            return self._make_bill(day, bill_type)

    # -- the two calls -------------------------------------------------------------------------

    def _answer_bill(self, kind: str, raw_path: str) -> Reply:
        params, refused = _query_params(raw_path)
        if refused is not None:
            return refused
        return self._apply_for_bill(params) if kind == "trade_bill" else self._download_bill(params)

    def _apply_for_bill(self, params: Mapping[str, str]) -> Reply:
        text, bill_type, tar_type = params.get("bill_date", ""), params.get("bill_type", "ALL"), params.get("tar_type")
        try:
            day = date.fromisoformat(text) if _DATE.match(text) else None
        except ValueError:
            day = None
        if day is None:
            return self._refuse("PARAM_ERROR", "bill_date must be a date, YYYY-MM-DD")
        if bill_type not in BILL_TYPES:
            return self._refuse("PARAM_ERROR", f"bill_type must be one of {', '.join(BILL_TYPES)}")
        if tar_type not in (None, "GZIP"):
            return self._refuse("PARAM_ERROR", "tar_type must be GZIP, or absent for a plain file")
        with self._changed:
            self.bill_counts["applied"] += 1
            now = self._clock()
            today = beijing_day(now)
            if day > today:
                return self._refuse("PARAM_ERROR", "bill_date is in the future")
            if day < months_before(today, BILL_MONTHS):
                return self._refuse("PARAM_ERROR", f"only the bills of the last {BILL_MONTHS} months can be downloaded")
            ready_at = (
                None if self.bill_ready_after is None else day_start(day + timedelta(days=1)) + self.bill_ready_after
            )
            if day in self._creating or (ready_at is not None and now < ready_at):
                self.bill_counts["creating"] += 1
                return _error(400, "STATEMENT_CREATING", "the bill is being made; try again after 10:00")
            key = (day, bill_type, self._bill_columns)
            bill = self._made.get(key)
            if bill is None:
                bill = self._make_bill(day, bill_type)
                if bill is not None and now >= day_start(day + timedelta(days=1)):
                    self._made[key] = bill
            if bill is None:
                self.bill_counts["no_statement"] += 1
                return _error(400, "NO_STATEMENT_EXIST", "no bill: the merchant had no trades that day")
            for token in [t for t, d in self._downloads.items() if d.expires_at <= now]:
                del self._downloads[token]
            token = secrets.token_urlsafe(24)
            self._downloads[token] = _Download(bill, tar_type == "GZIP", now + DOWNLOAD_VALID_SECONDS)
            base = self.bill_download_base or self.base_url
        return Reply(
            200,
            {
                "hash_type": "SHA1",
                "hash_value": hashlib.sha1(bill).hexdigest(),
                "download_url": f"{base}{DOWNLOAD_PATH}?token={token}",
            },
        )

    def _download_bill(self, params: Mapping[str, str]) -> Reply:
        with self._changed:
            download = self._downloads.get(params.get("token", ""))
            if download is None or download.expires_at <= self._clock():
                return self._refuse("RESOURCE_NOT_EXISTS", "the download_url has expired or never existed", 404)
            strike = self.faults.draw_download()
            self.bill_counts["downloaded" if strike is None else f"spoiled/{strike.label}"] += 1

        def deliver(bill: bytes) -> FileReply:
            return FileReply(200, body=gzip.compress(bill, compresslevel=6, mtime=0) if download.gzip else bill)

        return deliver(download.bill) if strike is None else strike.answer(download.bill, deliver)

    # -- making the bill --------------------------------------------------------------------------

    def _make_bill(self, day: date, bill_type: str) -> bytes | None:
        """The day's bill from what is recorded, refund statuses as they stand now; None without trades.
        Caller holds the lock."""
        start, end = day_start(day), day_start(day + timedelta(days=1))
        now = self._clock()
        paid = [
            p for p in self._payments.values() if p.paid and p.success_at is not None and start <= p.success_at < end
        ]
        refunds = [r for r in self._refunds.values() if start <= r.created_at < end]
        if not paid and not refunds:
            return None
        moved = False
        for refund in refunds:
            moved |= self._advance(refund, now)
        if moved:
            self._changed.notify_all()
        rows: list[tuple[float, int, dict[str, str]]] = []
        if bill_type in ("ALL", "SUCCESS"):
            rows += [(p.success_at or 0.0, 0, self._payment_row(p)) for p in paid]
        if bill_type in ("ALL", "REFUND"):
            rows += [(r.created_at, 1, self._refund_row(r, bill_type)) for r in refunds]
        rows.sort(key=lambda entry: (entry[0], entry[1]))
        default = {"ALL": ALL_COLUMNS, "SUCCESS": SUCCESS_COLUMNS, "REFUND": REFUND_COLUMNS}[bill_type]
        lines = [row for _, _, row in rows]
        if self.duplicate_refund_line and refunds and bill_type != "SUCCESS":
            first = next(row for _, kind, row in rows if kind == 1)
            if self.duplicate_refund_line == "summary_too":
                lines.append(first)  # the summary counts it too: a bill that adds up, with one refund twice
            else:
                return render_bill(lines, self._bill_columns or default, extra=[first])  # the summary does not count it
        return render_bill(lines, self._bill_columns or default)

    def _common(self, payment_time: float, transaction_id: str, out_trade_no: str) -> dict[str, str]:
        return {
            "交易时间": _when(payment_time),
            "公众账号ID": self.keys.appid,
            "商户号": self.keys.mchid,
            "特约商户号": "0",
            "设备号": "",
            "微信订单号": transaction_id,
            "商户订单号": out_trade_no,
            "用户标识": OPENID,
            "交易类型": "NATIVE",
            "付款银行": "OTHERS",
            "货币种类": "CNY",
            "代金券金额": "0.00",
            "商品名称": GOODS_NAME,
            "商户数据包": "",
            "费率": "0.60%",
            "费率备注": "",
        }

    def _payment_row(self, payment: Payment) -> dict[str, str]:
        row = self._common(payment.success_at or 0.0, payment.transaction_id, payment.out_trade_no)
        row.update(
            {
                "交易状态": "SUCCESS",
                "应结订单金额": yuan(payment.total),
                "微信退款单号": "0",
                "商户退款单号": "0",
                "退款金额": "0.00",
                "充值券退款金额": "0.00",
                "退款类型": "",
                "退款状态": "",
                "手续费": yuan(_fee(payment.total)),
                "订单金额": yuan(payment.total),
                "申请退款金额": "0.00",
            }
        )
        return row

    def _refund_row(self, refund: Refund, bill_type: str) -> dict[str, str]:
        payment = self._payments.get(refund.out_trade_no)
        paid_at = payment.success_at if payment is not None and payment.success_at is not None else refund.created_at
        # The ALL bill dates a refund row by its acceptance; the REFUND bill keeps the payment's time
        # in 交易时间 and the refund's own in 退款申请时间 and 退款成功时间.
        row = self._common(
            paid_at if bill_type == "REFUND" else refund.created_at, refund.transaction_id, refund.out_trade_no
        )
        order_fen = refund.total if bill_type == "REFUND" else 0  # in the ALL bill the payment's row carries it
        row.update(
            {
                "交易状态": "REFUND",
                "应结订单金额": yuan(order_fen),
                "订单金额": yuan(order_fen),
                "退款申请时间": _when(refund.created_at),
                "退款成功时间": _when(refund.success_at)
                if refund.status == STATUS_SUCCESS and refund.success_at
                else "",
                "微信退款单号": refund.refund_id,
                "商户退款单号": refund.out_refund_no,
                "退款金额": yuan(refund.refund),
                "充值券退款金额": "0.00",
                "退款类型": "ORIGINAL",
                "退款状态": refund.status,
                "手续费": "0.00",
                "申请退款金额": yuan(refund.refund),
            }
        )
        return row

    def _refuse(self, code: str, message: str, status: int = 400) -> Reply:
        with self._lock:
            self.bill_counts["refused"] += 1
        return _error(status, code, message)


def _query_params(raw_path: str) -> tuple[dict[str, str], Reply | None]:
    try:
        parsed = parse_qs(urlsplit(raw_path).query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return {}, _error(400, "PARAM_ERROR", "the query string does not parse")
    if any(len(values) != 1 for values in parsed.values()):
        return {}, _error(400, "PARAM_ERROR", "a parameter is given more than once")
    return {name: values[0] for name, values in parsed.items()}, None
