"""The daily bill over real HTTP: the live WeChatPayGateway and SDK, real signatures, the emulator.

The emulator's clock is moved by hand, days at a time; the only wall-clock waits are the ones
the behaviour is about (a trickled download cut at its time bound).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import pytest

from cancel_scanner.gateway.contract import (
    BillDownloadFailed,
    BillReady,
    ConfigError,
    NotSent,
    Permanent,
    RefundRequest,
    RetryLater,
)
from cancel_scanner.gateway.emulator import BEIJING, LEGACY_ALL_COLUMNS
from cancel_scanner.gateway.keys import generate_key_material
from cancel_scanner.operations.bill import Bill, BillError, BillNotReady, NoBill, fetch_bill
from tests.gateway_fixtures import FakeClock
from tests.integration.test_gateway_http import PeakRss, timed

DAY = date(2024, 5, 1)


def at(day: date, hour: int, minute: int = 0, second: int = 0) -> float:
    """Epoch seconds of a Beijing wall-clock time."""
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=BEIJING).timestamp()


def utc(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=BEIJING).astimezone(UTC)


@pytest.fixture
def emulator_clock() -> FakeClock:
    return FakeClock(at(DAY, 8))


@pytest.fixture
def clock(emulator_clock):
    def move_to(epoch: float) -> None:
        emulator_clock.advance(epoch - emulator_clock())

    return move_to


def refund(gateway, number: str, order: str, fen: int, total: int):
    return gateway.apply(RefundRequest(out_refund_no=number, out_trade_no=order, refund_amount=fen, total_amount=total))


@pytest.fixture
def a_day_of_trades(gateway, emulator, clock):
    """Payments and refunds around DAY; returns what DAY's bill must hold."""
    clock(at(DAY, 0) - 60)
    emulator.register_payment("O0", 500)  # paid the evening before: not DAY's
    clock(at(DAY, 8))
    emulator.register_payment("O1", 1280)
    emulator.create_trade("O2", 990)
    clock(at(DAY, 9, 30))
    assert emulator.user_pays("O2")
    emulator.register_payment("O3", 1000)
    emulator.close_refunds_for("R2")
    emulator.abnormal_for("R3")
    clock(at(DAY, 10))
    refund(gateway, "R1", "O1", 1280, 1280)
    clock(at(DAY, 12))
    refund(gateway, "R2", "O2", 300, 990)
    refund(gateway, "R3", "O2", 200, 990)
    refund(gateway, "R4", "O3", 1000, 1000)
    emulator.force_status("R4", "PROCESSING")  # still in flight when the bill is made
    clock(at(DAY, 23))
    emulator.register_payment("O4", 800)
    clock(at(DAY, 23, 59, 59))
    refund(gateway, "R5", "O4", 100, 800)  # accepted one second before midnight: DAY's
    clock(at(DAY + timedelta(days=1), 0, 0, 1))
    refund(gateway, "R6", "O4", 200, 800)  # one second after: the next day's
    return {
        "refunds": {
            ("R1", "O1", 1280, "SUCCESS", utc(DAY, 10)),
            ("R2", "O2", 300, "CLOSED", utc(DAY, 12)),
            ("R3", "O2", 200, "ABNORMAL", utc(DAY, 12)),
            ("R4", "O3", 1000, "PROCESSING", utc(DAY, 12)),
            ("R5", "O4", 100, "SUCCESS", utc(DAY, 23, 59, 59)),
        },
        "payments": {
            ("O1", 1280, utc(DAY, 8)),
            ("O2", 990, utc(DAY, 9, 30)),
            ("O3", 1000, utc(DAY, 9, 30)),
            ("O4", 800, utc(DAY, 23)),
        },
    }


def refunds_of(bill: Bill) -> set[tuple]:
    return {(r.out_refund_no, r.out_trade_no, r.refund_fen, r.status, r.at) for r in bill.refunds}


def payments_of(bill: Bill) -> set[tuple]:
    return {(p.out_trade_no, p.total_fen, p.at) for p in bill.payments if p.status == "SUCCESS"}


def ready(clock, day: date = DAY) -> None:
    clock(at(day + timedelta(days=1), 10))


# -- a day's bill ----------------------------------------------------------------------------------


def test_a_days_bill_holds_exactly_its_payments_and_refunds(gateway, emulator, clock, a_day_of_trades):
    ready(clock)

    bill = fetch_bill(gateway, DAY)

    assert isinstance(bill, Bill) and bill.bill_date == DAY
    assert refunds_of(bill) == a_day_of_trades["refunds"]
    assert payments_of(bill) == a_day_of_trades["payments"]
    assert bill.rows == len(bill.refunds) + len(bill.payments) == 9
    for r in bill.refunds:  # WeChat's numbers, as the emulator recorded them
        assert r.wx_refund_id == emulator.refund_id(r.out_refund_no)
    transaction = {p.out_trade_no: p.transaction_id for p in bill.payments}
    assert all(r.transaction_id == transaction[r.out_trade_no] for r in bill.refunds)


def test_the_refund_one_second_after_midnight_is_in_the_next_days_bill(gateway, clock, a_day_of_trades):
    ready(clock, DAY + timedelta(days=1))

    bill = fetch_bill(gateway, DAY + timedelta(days=1))

    assert [(r.out_refund_no, r.at) for r in bill.refunds] == [("R6", utc(DAY + timedelta(days=1), 0, 0, 1))]
    assert bill.payments == ()  # O4 was paid on DAY


def test_the_refund_bill_has_the_refunds_only(gateway, clock, a_day_of_trades):
    ready(clock)

    bill = fetch_bill(gateway, DAY, bill_type="REFUND")

    assert refunds_of(bill) == a_day_of_trades["refunds"]
    assert bill.payments == ()


def test_an_older_merchants_shorter_columns_give_the_same_bill(gateway, emulator, clock, a_day_of_trades):
    emulator.bill_columns = LEGACY_ALL_COLUMNS
    ready(clock)

    bill = fetch_bill(gateway, DAY)

    assert "申请退款金额" not in emulator.bill_bytes(DAY).decode("utf-8-sig").splitlines()[0]
    assert refunds_of(bill) == a_day_of_trades["refunds"]
    assert payments_of(bill) == a_day_of_trades["payments"]


def test_the_bill_is_made_once_and_its_statuses_are_those_of_that_moment(gateway, emulator, clock, a_day_of_trades):
    ready(clock)
    first = fetch_bill(gateway, DAY)
    emulator.force_status("R4", "SUCCESS")

    again = fetch_bill(gateway, DAY)
    emulator.forget_bills()
    remade = fetch_bill(gateway, DAY)

    status = lambda bill: {r.out_refund_no: r.status for r in bill.refunds}["R4"]  # noqa: E731
    assert (status(first), status(again), status(remade)) == ("PROCESSING", "PROCESSING", "SUCCESS")


def test_the_gateway_reports_the_apply_to_its_observer(gateway, clock, a_day_of_trades):
    seen = []
    gateway.on_answer = lambda endpoint, result: seen.append((endpoint, type(result)))
    ready(clock)

    fetch_bill(gateway, DAY)

    assert seen == [("trade_bill", BillReady)]


# -- not ready, no bill, refused -------------------------------------------------------------------


def test_before_ten_the_next_morning_the_bill_is_being_made(gateway, clock, a_day_of_trades):
    clock(at(DAY + timedelta(days=1), 9, 59, 59))
    assert fetch_bill(gateway, DAY) == BillNotReady(
        "STATEMENT_CREATING", "the bill is being made; try again after 10:00"
    )

    clock(at(DAY + timedelta(days=1), 10))
    assert isinstance(fetch_bill(gateway, DAY), Bill)


def test_statement_creating_holds_a_day_until_cleared(gateway, emulator, clock, a_day_of_trades):
    emulator.statement_creating(DAY)
    ready(clock)

    held = gateway.trade_bill(DAY)
    assert isinstance(held, RetryLater) and held.code == "STATEMENT_CREATING"
    assert isinstance(fetch_bill(gateway, DAY), BillNotReady)

    emulator.statement_creating(DAY, False)
    assert isinstance(fetch_bill(gateway, DAY), Bill)


def test_a_day_without_trades_has_no_bill(gateway, emulator, clock, a_day_of_trades):
    quiet = DAY - timedelta(days=2)

    result = gateway.trade_bill(quiet)

    assert isinstance(result, Permanent) and result.code == "NO_STATEMENT_EXIST"
    assert fetch_bill(gateway, quiet) == NoBill(quiet)
    assert emulator.bill_counts["downloaded"] == 0


@pytest.mark.parametrize(
    ("day", "complaint"), [(DAY - timedelta(days=100), "3 months"), (DAY + timedelta(days=1), "future")]
)
def test_a_day_older_than_three_months_or_still_to_come_is_refused(gateway, day, complaint):
    with pytest.raises(BillError) as refused:
        fetch_bill(gateway, day)

    assert refused.value.code == "PARAM_ERROR" and complaint in refused.value.message


def test_a_deadline_already_past_sends_nothing(gateway, emulator):
    result = gateway.trade_bill(DAY, deadline=lambda: time.monotonic() - 1)

    assert isinstance(result, NotSent)
    assert emulator.logged_requests() == []


def test_the_download_is_signed_and_checked_like_every_call(
    gateway, key_material, make_gateway, clock, a_day_of_trades
):
    ready(clock)
    url = gateway.trade_bill(DAY).download_url
    stranger = make_gateway(merchant_private_key_pem=generate_key_material().merchant_private_key_pem)

    with pytest.raises(BillDownloadFailed) as failed:
        stranger.download_bill(url)

    assert isinstance(failed.value.result, ConfigError) and failed.value.result.code == "SIGN_ERROR"
    assert len(gateway.download_bill(url)) > 0  # the URL itself was fine


def test_a_download_url_past_its_five_minutes_is_gone(gateway, clock, emulator_clock, a_day_of_trades):
    ready(clock)
    url = gateway.trade_bill(DAY).download_url
    emulator_clock.advance(301)

    with pytest.raises(BillDownloadFailed) as failed:
        gateway.download_bill(url)

    assert isinstance(failed.value.result, RetryLater) and failed.value.result.code == "RESOURCE_NOT_EXISTS"
    assert isinstance(fetch_bill(gateway, DAY), Bill)  # a new apply, a new URL


# -- downloads that must not be trusted -----------------------------------------------------------


def test_a_corrupted_download_is_bad_hash(gateway, emulator, clock, a_day_of_trades):
    ready(clock)
    emulator.spoil_next_download("bad_hash")

    with pytest.raises(BillError) as refused:
        fetch_bill(gateway, DAY)

    assert refused.value.code == "BAD_HASH"
    assert isinstance(fetch_bill(gateway, DAY), Bill)


def test_a_download_url_on_another_host_is_refused_without_a_request(
    gateway, emulator, stray_server, clock, a_day_of_trades
):
    emulator.bill_download_base = stray_server.base_url
    ready(clock)

    with pytest.raises(BillError) as refused:
        fetch_bill(gateway, DAY)

    assert refused.value.code == "UNTRUSTED_URL"
    assert stray_server.seen == []
    assert emulator.bill_counts["downloaded"] == 0


@pytest.mark.parametrize(
    "make_url",
    [
        lambda base, stray: f"{stray}/v3/billdownload/file?token=t",
        lambda base, stray: base.replace("http://", "https://") + "/v3/billdownload/file?token=t",
        lambda base, stray: f"{base[:-1]}/v3/billdownload/file?token=t",  # another port
        lambda base, stray: f"http://{base[len('http://') :]}@{stray[len('http://') :]}/v3/billdownload/file?token=t",
        lambda base, stray: f"{base}.evil.example/v3/billdownload/file?token=t",
        lambda base, stray: f"{base}/v3/billdownload/file?token=a b",
        lambda base, stray: f"{base}/v3/billdownload/file?token=t#x",
        lambda base, stray: "/v3/billdownload/file?token=t",
        lambda base, stray: f"{base}",
    ],
    ids=[
        "other-host",
        "other-scheme",
        "other-port",
        "userinfo",
        "host-suffix",
        "unsafe-character",
        "fragment",
        "relative",
        "no-path",
    ],
)
def test_no_download_url_but_one_on_the_gateways_own_host_is_requested(gateway, emulator, stray_server, make_url):
    url = make_url(emulator.base_url, stray_server.base_url)

    with pytest.raises(BillDownloadFailed) as failed:
        gateway.download_bill(url)

    assert isinstance(failed.value.result, Permanent) and failed.value.result.code == "UNTRUSTED_URL"
    assert emulator.logged_requests() == [] and stray_server.seen == []


def test_a_redirected_download_is_not_followed(gateway, emulator, stray_server, clock, a_day_of_trades):
    ready(clock)
    emulator.spoil_next_download("redirect", redirect_to=stray_server.base_url)

    with pytest.raises(BillError) as refused:
        fetch_bill(gateway, DAY)

    assert refused.value.code == "REDIRECT"
    assert stray_server.seen == []


# The emulator makes an oversized download when asked for it (100 MB deflated for the bomb): on a busy
# machine that can take longer than the 1 s read timeout of the tests' gateway, and the download would
# end as a TIMEOUT before the cap is reached. These tests are about the cap, so their client waits longer.
PATIENT_TIMEOUT_SECONDS = (1.0, 15.0)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_a_download_over_the_cap_stops_at_the_cap(make_gateway, emulator, clock, a_day_of_trades, chunked):
    gateway = make_gateway(timeout=PATIENT_TIMEOUT_SECONDS)
    ready(clock)
    emulator.spoil_next_download("huge", huge_bytes=20_000_000, huge_chunked=chunked)

    with PeakRss() as rss, pytest.raises(BillError) as refused:
        timed(lambda: fetch_bill(gateway, DAY, max_bytes=1_000_000))

    assert refused.value.code == "TOO_LARGE"
    assert rss.growth_mb < 20, rss.growth_mb


def test_a_small_download_that_inflates_past_the_cap_stops_at_the_cap(make_gateway, emulator, clock, a_day_of_trades):
    gateway = make_gateway(timeout=PATIENT_TIMEOUT_SECONDS)
    ready(clock)
    emulator.spoil_next_download("bomb", huge_bytes=100_000_000)  # ~100 KB on the wire

    with PeakRss() as rss, pytest.raises(BillError) as refused:
        fetch_bill(gateway, DAY, max_bytes=2_000_000)

    assert refused.value.code == "TOO_LARGE"
    assert rss.growth_mb < 30, rss.growth_mb


def test_a_trickled_download_ends_at_its_time_bound(make_gateway, emulator, clock, a_day_of_trades):
    # One byte every 0.2 s never trips the 1 s read timeout: only the bound on the whole download stops it.
    gateway = make_gateway(timeout=(1.0, 1.0))
    ready(clock)
    emulator.spoil_next_download("trickle", trickle_gap=0.2)

    result, elapsed = timed(lambda: fetch_bill(gateway, DAY, max_seconds=1.0))

    assert isinstance(result, BillNotReady) and result.code == "TIMEOUT"
    assert 0.9 <= elapsed < 1.8, elapsed


def test_a_failed_download_is_not_ready_and_the_next_try_gets_the_bill(gateway, emulator, clock, a_day_of_trades):
    ready(clock)
    emulator.spoil_next_download("500")

    assert fetch_bill(gateway, DAY) == BillNotReady(
        "SYSTEM_ERROR", "system error, please retry with the same out_refund_no"
    )
    assert isinstance(fetch_bill(gateway, DAY), Bill)
