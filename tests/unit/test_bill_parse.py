"""Reading WeChat Pay's daily bill: bytes in, exact fen and UTC times out, anything odd refused.

The bills here are written by hand in WeChat's format (not by the emulator), so a mistake shared
by the emulator and the parser cannot hide.
"""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, date, datetime

import pytest

from cancel_scanner.gateway.contract import (
    BillDownloadFailed,
    BillReady,
    ConfigError,
    NotSent,
    Permanent,
    RetryLater,
    UnknownOutcome,
)
from cancel_scanner.gateway.wechat import _gunzip_within
from cancel_scanner.operations.bill import (
    Bill,
    BillError,
    BillNotReady,
    BillPayment,
    BillRefund,
    NoBill,
    check_sha1,
    fetch_bill,
    parse_bill,
    to_fen,
)

DAY = date(2024, 5, 1)
BOM = "\ufeff"
ALL_HEADER = (
    "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
    "应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,"
    "手续费,费率,订单金额,申请退款金额,费率备注"
)
SUMMARY_HEADER = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额"


def row(**values: str) -> dict[str, str]:
    """A detail row of the ALL bill: a payment unless told otherwise."""
    base = {
        "交易时间": "2024-05-01 10:00:00",
        "公众账号ID": "wx2421b1c4370ec43b",
        "商户号": "1900000109",
        "特约商户号": "0",
        "设备号": "",
        "微信订单号": "4200000001202405010000000001",
        "商户订单号": "O1",
        "用户标识": "oUpF8uMuAJO_M2pxb1Q9",
        "交易类型": "JSAPI",
        "交易状态": "SUCCESS",
        "付款银行": "CMB_DEBIT",
        "货币种类": "CNY",
        "应结订单金额": "12.30",
        "代金券金额": "0.00",
        "微信退款单号": "0",
        "商户退款单号": "0",
        "退款金额": "0.00",
        "充值券退款金额": "0.00",
        "退款类型": "",
        "退款状态": "",
        "商品名称": "茶叶",
        "商户数据包": "",
        "手续费": "0.07",
        "费率": "0.60%",
        "订单金额": "12.30",
        "申请退款金额": "0.00",
        "费率备注": "",
    }
    base.update(values)
    return base


def refund_row(**values: str) -> dict[str, str]:
    return row(
        **{
            "交易状态": "REFUND",
            "应结订单金额": "0.00",
            "订单金额": "0.00",
            "微信退款单号": "50300000012024050100000001",
            "商户退款单号": "RF1",
            "退款金额": "12.30",
            "申请退款金额": "12.30",
            "退款类型": "ORIGINAL",
            "退款状态": "SUCCESS",
            "交易时间": "2024-05-01 11:00:00",
            **values,
        }
    )


def quoted(value: str) -> str:
    value = "`" + value
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\r\n') else value


def yuan_sum(rows: list[dict[str, str]], column: str) -> str:
    """Test data only: a few values of two decimals (junk counts as nothing: the line is refused anyway)."""

    def fen(text: str) -> int:
        whole, _, cents = text.partition(".")
        return int(whole) * 100 + int(cents.ljust(2, "0")) if whole.isdigit() and (cents.isdigit() or not cents) else 0

    total = sum(fen(r.get(column) or "0") for r in rows)
    return f"{total // 100}.{total % 100:02d}"


def adding_up(rows: list[dict[str, str]]) -> str:
    """The summary row WeChat writes under these rows: their count and each column's sum."""
    columns = ("应结订单金额", "退款金额", "充值券退款金额", "手续费", "订单金额", "申请退款金额")
    return ",".join([f"`{len(rows)}", *(f"`{yuan_sum(rows, c)}" for c in columns)])


def bill_text(
    rows: list[dict[str, str]],
    header: str = ALL_HEADER,
    *,
    bom: bool = True,
    summary: str | None = None,
    newline: str = "\r\n",
) -> bytes:
    columns = header.split(",")
    lines = [header] + [",".join(quoted(r.get(c, "")) for c in columns) for r in rows]
    lines += [SUMMARY_HEADER, summary if summary is not None else adding_up(rows)]
    return ((BOM if bom else "") + newline.join(lines) + newline).encode("utf-8")


# -- reading a bill ------------------------------------------------------------------------------


def test_a_bill_with_a_bom_and_backticks_reads_its_payments_and_refunds():
    data = bill_text([row(), refund_row()])

    bill = parse_bill(data, DAY)

    assert bill == Bill(
        bill_date=DAY,
        refunds=(
            BillRefund(
                "O1",
                "RF1",
                1230,
                "SUCCESS",
                "50300000012024050100000001",
                "4200000001202405010000000001",
                datetime(2024, 5, 1, 3, 0, tzinfo=UTC),
            ),
        ),
        payments=(
            BillPayment("O1", "4200000001202405010000000001", 1230, "SUCCESS", datetime(2024, 5, 1, 2, 0, tzinfo=UTC)),
        ),
        rows=2,
    )


def test_times_are_beijing_time_so_just_after_midnight_is_the_day_before_in_utc():
    bill = parse_bill(bill_text([refund_row(交易时间="2024-05-01 00:00:05"), row(交易时间="2024-05-01 23:59:59")]), DAY)

    assert bill.refunds[0].at == datetime(2024, 4, 30, 16, 0, 5, tzinfo=UTC)
    assert bill.payments[0].at == datetime(2024, 5, 1, 15, 59, 59, tzinfo=UTC)
    assert bill.refunds[0].at.tzinfo is not None


def test_a_bill_without_a_bom_and_with_bare_newlines_reads_the_same():
    data = [row(), refund_row()]

    assert parse_bill(bill_text(data, bom=False, newline="\n"), DAY) == parse_bill(bill_text(data), DAY)


@pytest.mark.parametrize(
    ("text", "fen"),
    [
        ("0.01", 1),
        ("0.10", 10),
        ("12.30", 1230),
        ("12.3", 1230),
        ("12", 1200),
        ("99999.99", 9999999),
        ("0.00", 0),
        ("1000000.00", 100000000),
        ("`12.30", 1230),
        (" 7.05 ", 705),
    ],
)
def test_amounts_in_yuan_become_exact_fen(text, fen):
    assert to_fen(text) == fen


def test_amounts_that_floats_would_get_wrong_are_exact():
    # 0.29 * 100 == 28.999999999999996 and 1.15 * 100 == 114.99999999999999 in binary floating point.
    bill = parse_bill(bill_text([row(订单金额="0.29"), refund_row(申请退款金额="1.15", 退款金额="1.15")]), DAY)

    assert bill.payments[0].total_fen == 29
    assert bill.refunds[0].refund_fen == 115


@pytest.mark.parametrize(
    "junk", ["1.234", "abc", "-1.00", "1,000.00", "", "1e3", "１２.００", "12.", ".50", "0x10", "12.30元"]
)
def test_junk_in_an_amount_is_refused_with_bad_format(junk):
    with pytest.raises(BillError) as refused:
        parse_bill(bill_text([refund_row(申请退款金额=junk)]), DAY)

    assert refused.value.code == "BAD_FORMAT"
    assert "line 2" in refused.value.message


def test_an_older_bill_with_fewer_columns_in_another_order_is_read_by_name():
    # No 订单金额, 申请退款金额 or 费率备注; the order shuffled, so positions mean nothing.
    legacy = (
        "商户订单号,交易时间,公众账号ID,商户号,子商户号,设备号,微信订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
        "总金额,代金券或立减优惠金额,微信退款单号,商户退款单号,退款金额,代金券或立减优惠退款金额,退款类型,退款状态,"
        "商品名称,商户数据包,手续费,费率"
    )
    payment = row(总金额="88.80")
    refund = refund_row(退款金额="20.00")

    bill = parse_bill(bill_text([payment, refund], header=legacy, summary="`2,`88.80,`20.00,`0.00,`0.53"), DAY)

    assert [(p.out_trade_no, p.total_fen) for p in bill.payments] == [("O1", 8880)]
    assert [(r.out_refund_no, r.refund_fen, r.status) for r in bill.refunds] == [("RF1", 2000, "SUCCESS")]


def test_the_newest_amount_column_wins_over_the_older_one():
    # 申请退款金额 is what we asked; 退款金额 what was settled (less a coupon): we compare what we asked.
    bill = parse_bill(
        bill_text([refund_row(申请退款金额="10.00", 退款金额="9.50"), row(订单金额="10.00", 应结订单金额="9.00")]), DAY
    )

    assert bill.refunds[0].refund_fen == 1000
    assert bill.payments[0].total_fen == 1000


def test_the_summary_is_not_read_as_rows():
    bill = parse_bill(bill_text([row(), refund_row()]), DAY)

    assert bill.rows == 2 and len(bill.payments) == 1 and len(bill.refunds) == 1


@pytest.mark.parametrize(
    "summary, complaint",
    [
        # Issue 23: a refund line duplicated while the summary still counts the lines it had.
        ("`2,`12.30,`24.60,`0.00,`0.21,`12.30,`24.60", "its summary counts 2 trades, its lines are 3"),
        (
            "`3,`12.30,`24.60,`0.00,`0.21,`12.30,`12.30",
            "申请退款总金额 is 12.30 yuan, its lines' 申请退款金额 add up to 24.60",
        ),
        ("`3,`12.30,`12.30,`0.00,`0.21,`12.30,`24.60", "退款总金额 is 12.30 yuan, its lines' 退款金额 add up to 24.60"),
    ],
)
def test_a_bill_whose_summary_does_not_add_up_to_its_lines_is_not_trusted(summary, complaint):
    lines = [row(), refund_row(), refund_row(**{"商户退款单号": "RF2", "微信退款单号": "50300000012024050100000002"})]
    assert parse_bill(bill_text(lines), DAY).rows == 3  # adding up: read
    with pytest.raises(BillError) as refused:
        parse_bill(bill_text(lines, summary=summary), DAY)
    assert refused.value.code == "BILL_TOTALS_DIFFER" and complaint in refused.value.message


def test_a_summary_with_junk_for_an_amount_it_is_checked_on_is_bad_format():
    with pytest.raises(BillError) as refused:
        parse_bill(bill_text([row()], summary="`1,`12.30,`junk,`0.00,`0.07,`12.30,`0.00"), DAY)
    assert refused.value.code == "BAD_FORMAT"


def test_a_bill_without_detail_rows_is_an_empty_bill():
    bill = parse_bill(bill_text([], summary="`0,`0.00,`0.00,`0.00,`0.00,`0.00,`0.00"), DAY)

    assert bill == Bill(bill_date=DAY, refunds=(), payments=(), rows=0)


def test_goods_names_in_chinese_with_commas_and_quotes_keep_the_columns_in_place():
    name = '云南普洱，七子饼,357g "熟茶"'
    data = bill_text([row(商品名称=name), refund_row(商品名称=name, 申请退款金额="3.57")])
    assert '"`云南普洱，七子饼,357g ""熟茶"""'.encode() in data  # quoted as CSV quotes it

    bill = parse_bill(data, DAY)

    assert bill.payments[0].total_fen == 1230
    assert bill.refunds[0].refund_fen == 357 and bill.refunds[0].status == "SUCCESS"


def test_refund_statuses_are_kept_as_the_bill_writes_them():
    statuses = ["SUCCESS", "PROCESSING", "CLOSED", "ABNORMAL", "REFUNDCLOSE"]
    rows = [refund_row(商户退款单号=f"RF{i}", 退款状态=status) for i, status in enumerate(statuses)]

    bill = parse_bill(bill_text(rows), DAY)

    assert [r.status for r in bill.refunds] == statuses


def test_a_refund_bill_dates_each_refund_by_its_application_not_the_payment():
    header = ALL_HEADER.replace("代金券金额,", "代金券金额,退款申请时间,退款成功时间,")
    refund = refund_row(
        交易时间="2024-04-20 09:00:00", 退款申请时间="2024-05-01 23:59:59", 退款成功时间="2024-05-02 00:00:30"
    )

    bill = parse_bill(bill_text([refund], header=header), DAY)

    assert bill.refunds[0].at == datetime(2024, 5, 1, 15, 59, 59, tzinfo=UTC)


def test_a_payment_only_bill_without_refund_columns_reads_its_payments():
    header = ",".join(
        c
        for c in ALL_HEADER.split(",")
        if c
        not in {"微信退款单号", "商户退款单号", "退款金额", "充值券退款金额", "退款类型", "退款状态", "申请退款金额"}
    )
    bill = parse_bill(bill_text([row(), row(商户订单号="O2")], header=header), DAY)

    assert [p.out_trade_no for p in bill.payments] == ["O1", "O2"]


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"", "empty"),
        (bill_text([row()]).split(SUMMARY_HEADER.encode())[0], "summary"),
        (
            bill_text([row()]).replace(SUMMARY_HEADER.encode() + b"\r\n`1", SUMMARY_HEADER.encode() + b"\r\n1"),
            "backtick",
        ),
        (bill_text([row()]) + b"`extra,`row\r\n", "after the summary"),
        (bill_text([row()]).replace("茶叶".encode(), "茶叶".encode("gbk")), "UTF-8"),
        (bill_text([row()], header=ALL_HEADER.replace("商户订单号", "订单")), "商户订单号"),
        (bill_text([row()]).replace(b"`2024-05-01 10:00:00", b"2024-05-01 10:00:00"), "backtick"),
        (bill_text([row(交易时间="2024/05/01 10:00:00")]), "time"),
        (bill_text([row(交易时间="2024-02-30 10:00:00")]), "time"),
        (bill_text([refund_row(商户退款单号="0")]), "商户退款单号"),
        (bill_text([row()]).replace(b",`0.60%", b",`0.60%,`surplus"), "values under a header"),
    ],
    ids=[
        "empty",
        "no-summary",
        "summary-without-backticks",
        "text-after-summary",
        "not-utf8",
        "no-out-trade-no-column",
        "value-without-backtick",
        "time-format",
        "impossible-date",
        "refund-without-number",
        "row-too-wide",
    ],
)
def test_anything_but_wechats_format_is_bad_format(data, complaint):
    with pytest.raises(BillError) as refused:
        parse_bill(data, DAY)

    assert refused.value.code == "BAD_FORMAT"
    assert complaint in refused.value.message


def test_a_hundred_thousand_rows_parse_whole_and_exact():
    """A big day's bill (100,000 rows, commas and quotes in the goods' names) parses to the fen. How fast
    is bench/reconcile.py's to measure (target: >= 100,000 rows/s): a wall-clock bound here failed
    whenever the machine was busy."""
    header = ALL_HEADER.split(",")
    lines = [ALL_HEADER]
    for i in range(50_000):
        payment = row(商户订单号=f"O{i}", 订单金额=f"{i // 100}.{i % 100:02d}", 商品名称="茶叶，一盒,两罐")
        refund = refund_row(商户订单号=f"O{i}", 商户退款单号=f"RF{i}", 申请退款金额=f"{i // 100}.{i % 100:02d}")
        lines += [",".join(quoted(r[c]) for c in header) for r in (payment, refund)]
    asked = sum(range(50_000))  # fen: refund i asked i fen
    lines += [SUMMARY_HEADER, f"`100000,`0.00,`615000.00,`0.00,`0.00,`0.00,`{asked // 100}.{asked % 100:02d}"]
    data = (BOM + "\r\n".join(lines) + "\r\n").encode("utf-8")

    bill = parse_bill(data, DAY)

    assert bill.rows == 100_000 and len(bill.refunds) == len(bill.payments) == 50_000
    assert bill.refunds[-1].refund_fen == 49_999 and bill.payments[12_345].total_fen == 12_345


# -- the hash --------------------------------------------------------------------------------------


def test_the_sha1_must_be_the_one_wechat_sent():
    data = bill_text([row()])
    digest = hashlib.sha1(data).hexdigest()

    check_sha1(data, digest)
    check_sha1(data, digest.upper())  # hex is hex, whatever its case
    with pytest.raises(BillError) as refused:
        check_sha1(data.replace(b"12.30", b"12.31", 1), digest)

    assert refused.value.code == "BAD_HASH"


# -- fetching, with a stand-in gateway -------------------------------------------------------------


class StandInGateway:
    """Answers trade_bill and download_bill as told, and remembers the calls."""

    def __init__(self, applied, downloaded) -> None:
        self.applied, self.downloaded = applied, downloaded
        self.calls: list[str] = []

    def trade_bill(self, bill_date, *, bill_type="ALL", deadline=None):
        self.calls.append(f"trade_bill {bill_date} {bill_type}")
        return self.applied

    def download_bill(self, url, *, max_bytes, max_seconds, deadline=None):
        self.calls.append(f"download_bill {url} {max_bytes}")
        if isinstance(self.downloaded, BaseException):
            raise self.downloaded
        return self.downloaded


def test_fetch_bill_downloads_checks_and_parses():
    data = bill_text([row(), refund_row()])
    url = "https://api.mch.weixin.qq.com/v3/billdownload/file?token=t"
    gateway = StandInGateway(BillReady(hashlib.sha1(data).hexdigest(), url), data)

    bill = fetch_bill(gateway, DAY, max_bytes=1000)

    assert isinstance(bill, Bill) and bill.rows == 2
    assert gateway.calls == ["trade_bill 2024-05-01 ALL", f"download_bill {url} 1000"]


@pytest.mark.parametrize(
    ("applied", "expected"),
    [
        (RetryLater("STATEMENT_CREATING", "being made"), BillNotReady("STATEMENT_CREATING", "being made")),
        (UnknownOutcome("TIMEOUT", "no answer"), BillNotReady("TIMEOUT", "no answer")),
        (NotSent("DEADLINE", "no time"), BillNotReady("DEADLINE", "no time")),
        (Permanent("NO_STATEMENT_EXIST", "no trades"), NoBill(DAY)),
    ],
)
def test_an_apply_without_a_bill_says_whether_to_try_again(applied, expected):
    gateway = StandInGateway(applied, b"never downloaded")

    assert fetch_bill(gateway, DAY) == expected
    assert len(gateway.calls) == 1


@pytest.mark.parametrize("refusal", [Permanent("PARAM_ERROR", "too old"), ConfigError("SIGN_ERROR", "keys")])
def test_an_apply_refused_for_good_is_a_bill_error_with_wechats_code(refusal):
    with pytest.raises(BillError) as refused:
        fetch_bill(StandInGateway(refusal, b""), DAY)

    assert refused.value.code == refusal.code


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (UnknownOutcome("TIMEOUT", "slow"), BillNotReady("TIMEOUT", "slow")),
        (RetryLater("RESOURCE_NOT_EXISTS", "expired"), BillNotReady("RESOURCE_NOT_EXISTS", "expired")),
        (Permanent("TOO_LARGE", "big"), BillError("TOO_LARGE", "big")),
        (Permanent("UNTRUSTED_URL", "elsewhere"), BillError("UNTRUSTED_URL", "elsewhere")),
        (Permanent("NO_STATEMENT_EXIST", "odd"), BillError("NO_STATEMENT_EXIST", "odd")),
    ],
)
def test_a_failed_download_is_not_ready_or_a_bill_error(failure, expected):
    gateway = StandInGateway(BillReady("0" * 40, "https://x/y"), BillDownloadFailed(failure))

    if isinstance(expected, BillError):
        with pytest.raises(BillError) as refused:
            fetch_bill(gateway, DAY)
        assert (refused.value.code, refused.value.message) == (expected.code, expected.message)
    else:
        assert fetch_bill(gateway, DAY) == expected


def test_a_download_that_is_not_the_hashed_bill_is_bad_hash_before_it_is_parsed():
    gateway = StandInGateway(BillReady(hashlib.sha1(b"the real bill").hexdigest(), "https://x/y"), b"not even csv \xff")

    with pytest.raises(BillError) as refused:
        fetch_bill(gateway, DAY)

    assert refused.value.code == "BAD_HASH"


# -- decompression (the gateway's, bounded) -----------------------------------------------------------


def test_a_gzip_bill_decompresses_whole_also_in_several_members():
    data = bill_text([row()])

    assert _gunzip_within(gzip.compress(data), 10_000) == data
    assert _gunzip_within(gzip.compress(data[:100]) + gzip.compress(data[100:]), 10_000) == data


def test_a_gzip_that_inflates_past_the_cap_stops_at_the_cap():
    bomb = gzip.compress(bytes(50_000_000), compresslevel=9)  # ~50 KB that would be 50 MB
    assert len(bomb) < 100_000

    with pytest.raises(BillDownloadFailed) as failed:
        _gunzip_within(bomb, 1_000_000)

    assert isinstance(failed.value.result, Permanent) and failed.value.result.code == "TOO_LARGE"
    assert _gunzip_within(gzip.compress(bytes(1_000_000)), 1_000_000) == bytes(1_000_000)  # exactly the cap is fine


@pytest.mark.parametrize(
    "broken",
    [gzip.compress(b"x" * 1000)[:-12], gzip.compress(b"bill") + b"junk", b"\x1f\x8bnot gzip"],
    ids=["truncated", "trailing-junk", "garbage"],
)
def test_a_broken_gzip_is_bad_gzip(broken):
    with pytest.raises(BillDownloadFailed) as failed:
        _gunzip_within(broken, 10_000)

    assert failed.value.result.code == "BAD_GZIP"
