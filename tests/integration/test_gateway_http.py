"""The real WeChatPayGateway and SDK, over HTTP, against the emulator.

Status changes are driven by moving the emulator's clock. The only wall-clock
waits are the ones the behaviour is about: read timeouts, deadlines, trickled
answers and pacing; anything else waits on a condition with a deadline.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from base64 import b64decode, b64encode
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID
from loguru import logger

from cancel_scanner.gateway.contract import (
    Accepted,
    ConfigError,
    NotSent,
    Permanent,
    RefundRequest,
    RetryLater,
    UnknownOutcome,
)
from cancel_scanner.gateway.emulator import REFUNDS_PATH, Emulator
from cancel_scanner.gateway.keys import generate_key_material
from cancel_scanner.gateway.transport import new_session, send_within
from cancel_scanner.gateway.wechat import MAX_ANSWER_BYTES
from tests.gateway_fixtures import build_gateway
from testsupport.emulator_faults import FaultPlan
from testsupport.waiting import wait_until

PAID = 1280


def refund(number: str = "R1", order: str = "O1", amount: int = PAID, total: int = PAID) -> RefundRequest:
    return RefundRequest(out_refund_no=number, out_trade_no=order, refund_amount=amount, total_amount=total)


def post_count(emulator) -> int:
    return sum(count for (method, _), count in emulator.requests.items() if method == "POST")


# -- the happy path and idempotency ---------------------------------------------------


def test_an_accepted_refund_succeeds_once_its_delay_has_passed(gateway, emulator, emulator_clock):
    applied = gateway.apply(refund())

    assert isinstance(applied, Accepted)
    assert applied.refund.status == "PROCESSING"
    assert applied.request_id == emulator.last_request_id
    assert gateway.query("R1").refund.status == "PROCESSING"

    emulator_clock.advance(1)
    queried = gateway.query("R1")

    assert isinstance(queried, Accepted)
    assert queried.refund.status == "SUCCESS"
    assert queried.refund.refund_id == applied.refund.refund_id
    assert queried.refund.success_time is not None and queried.refund.success_time.tzinfo is None
    assert queried.refund.user_received_account == "支付用户零钱"  # non-ASCII survives signing both ways
    assert emulator.fen_refunded["O1"] == PAID


def test_a_replayed_refund_moves_money_once(gateway, emulator):
    first = gateway.apply(refund())
    second = gateway.apply(refund())

    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert second.refund.refund_id == first.refund.refund_id
    assert emulator.refunds_created["R1"] == 1
    assert emulator.fen_refunded["O1"] == PAID
    assert emulator.max_in_flight["R1"] == 1


def test_reusing_a_number_with_another_amount_is_permanent_and_moves_no_money(gateway, emulator):
    gateway.apply(refund(amount=1000))

    result = gateway.apply(refund(amount=1200))

    assert isinstance(result, Permanent)
    assert result.code == "INVALID_REQUEST"
    assert emulator.refunds_created["R1"] == 1
    assert emulator.fen_refunded["O1"] == 1000


def test_refunds_of_one_order_never_exceed_what_was_paid(gateway, emulator):
    assert isinstance(gateway.apply(refund("R1", amount=1000)), Accepted)

    result = gateway.apply(refund("R2", amount=281))

    assert isinstance(result, Permanent) and result.code == "INVALID_REQUEST"
    assert emulator.fen_refunded["O1"] == 1000


def test_with_strict_payments_an_unknown_order_is_retried_then_given_up(gateway, emulator):
    emulator.strict_payments = True

    result = gateway.apply(refund(order="NEVER-PAID"))

    assert isinstance(result, RetryLater)
    assert (result.code, result.give_up_after) == ("RESOURCE_NOT_EXISTS", 3)
    assert emulator.refunds_created["R1"] == 0


def test_with_strict_payments_a_total_other_than_the_paid_one_is_refused(gateway, emulator):
    emulator.strict_payments = True
    emulator.register_payment("O1", 1000)

    result = gateway.apply(refund(total=PAID, amount=PAID))

    assert isinstance(result, Permanent) and result.code == "INVALID_REQUEST"
    assert isinstance(gateway.apply(refund("R2", total=1000, amount=1000)), Accepted)


def test_querying_an_unknown_number_says_retry_later(gateway):
    result = gateway.query("NO-SUCH-REFUND")

    assert isinstance(result, RetryLater)
    assert result.code == "RESOURCE_NOT_EXISTS"


# -- faults: never Accepted, and the retry moves money once ------------------------------------


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("500", "SYSTEM_ERROR"),
        ("503", "SERVICE_UNAVAILABLE"),
        ("429", "FREQUENCY_LIMITED"),
        ("drop", "CONNECTION_ERROR"),
        ("bad_signature", "BAD_SIGNATURE"),
    ],
)
def test_a_failed_apply_is_unknown_and_its_retry_moves_money_once(gateway, emulator, kind, code, after_commit):
    emulator.fail_next("R1", kind, after_commit=after_commit)

    failed = gateway.apply(refund())
    retried = gateway.apply(refund())

    assert isinstance(failed, UnknownOutcome)
    assert failed.code == code
    assert isinstance(retried, Accepted)
    assert emulator.refunds_created["R1"] == 1
    assert emulator.fen_refunded["O1"] == PAID


@pytest.mark.parametrize("after_commit", [False, True], ids=["queued", "slow-answer"])
def test_an_answer_slower_than_the_read_timeout_is_unknown_and_the_retry_moves_money_once(
    make_gateway, emulator, after_commit
):
    gateway = make_gateway(timeout=(1.0, 0.3))
    emulator.fail_next("R1", "slow", after_commit=after_commit, slow_seconds=0.8)

    failed = gateway.apply(refund())
    retried = gateway.apply(refund())

    assert isinstance(failed, UnknownOutcome) and failed.code == "TIMEOUT"
    assert isinstance(retried, Accepted)
    # The slow request is still being served while the retry arrives: that is the race to survive.
    assert emulator.wait_for(lambda: post_count(emulator) == 2, timeout=5)
    assert emulator.max_in_flight["R1"] == 2
    assert emulator.refunds_created["R1"] == 1
    assert emulator.fen_refunded["O1"] == PAID


@pytest.mark.parametrize("kind", ["500", "429", "drop", "bad_signature"])
def test_a_failed_query_is_unknown(gateway, emulator, kind):
    gateway.apply(refund())
    emulator.fail_next("R1", kind, call="query")

    assert isinstance(gateway.query("R1"), UnknownOutcome)
    assert isinstance(gateway.query("R1"), Accepted)


def test_under_random_faults_every_refund_lands_exactly_once(make_gateway, emulator):
    gateway = make_gateway(apply_qps=None, query_qps=None)
    emulator.faults.plan = FaultPlan(
        p_5xx=0.25, p_429=0.05, p_drop=0.05, p_bad_signature=0.05, after_commit=0.5, seed=7
    )
    results = {}

    for i in range(40):
        for _attempt in range(50):
            result = gateway.apply(refund(f"R{i}", f"O{i}"))
            if not isinstance(result, UnknownOutcome):
                break
        results[i] = result

    assert all(isinstance(result, Accepted) for result in results.values())
    assert all(emulator.refunds_created[f"R{i}"] == 1 for i in range(40))
    assert all(emulator.fen_refunded[f"O{i}"] == PAID for i in range(40))
    assert emulator.requests[("POST", 500)] + emulator.requests[("POST", 503)] > 0


# -- business refusals ------------------------------------------------------------------------


def test_a_merchant_balance_too_low_is_retry_later(gateway, emulator, emulator_clock):
    emulator.fail_next("R1", "not_enough")

    assert isinstance(gateway.apply(refund()), RetryLater)
    assert emulator.refunds_created["R1"] == 0


def test_a_balance_outage_ends_at_its_time(gateway, emulator, emulator_clock):
    emulator.not_enough_until(emulator_clock() + 60)

    during = gateway.apply(refund())
    emulator_clock.advance(61)
    after = gateway.apply(refund())

    assert isinstance(during, RetryLater) and during.code == "NOT_ENOUGH"
    assert isinstance(after, Accepted)


def test_a_merchant_key_the_gateway_does_not_know_is_a_sign_error(key_material, emulator, make_gateway):
    stranger = generate_key_material()

    result = make_gateway(merchant_private_key_pem=stranger.merchant_private_key_pem).apply(refund())

    assert isinstance(result, ConfigError)
    assert result.code == "SIGN_ERROR"
    assert emulator.refunds_created["R1"] == 0


def test_an_unknown_mchid_is_a_configuration_error(make_gateway, emulator):
    result = make_gateway(mchid="1900009999").apply(refund())

    assert isinstance(result, ConfigError)
    assert result.code == "MCH_NOT_EXISTS"


def test_a_closed_refund_comes_back_closed_and_gives_the_money_back(gateway, emulator, emulator_clock):
    emulator.close_refunds_for("O1")
    gateway.apply(refund())
    emulator_clock.advance(1)

    result = gateway.query("R1")

    assert isinstance(result, Accepted)
    assert result.refund.status == "CLOSED"
    assert result.refund.success_time is None
    assert emulator.fen_refunded["O1"] == 0


def test_an_abnormal_refund_stays_abnormal_until_the_merchant_acts(gateway, emulator, emulator_clock):
    emulator.abnormal_for("R1")
    gateway.apply(refund())
    emulator_clock.advance(1)

    assert gateway.query("R1").refund.status == "ABNORMAL"
    emulator_clock.advance(3600)
    assert gateway.query("R1").refund.status == "ABNORMAL"

    assert emulator.resolve_abnormal("R1") == 1
    resolved = gateway.query("R1").refund

    assert resolved.status == "SUCCESS"
    assert resolved.success_time is not None


# -- rate limits ------------------------------------------------------------------------------


def test_the_emulator_answers_429_over_its_qps(key_material):
    frozen = time.monotonic()
    # A standing monotonic clock: every request lands in the same second.
    with Emulator(key_material, apply_qps=2, monotonic=lambda: frozen) as emulator:
        gateway = build_gateway(key_material, emulator.base_url, apply_qps=None)
        try:
            results = [gateway.apply(refund(f"R{i}", f"O{i}")) for i in range(3)]
        finally:
            gateway.close()

    assert [type(r) for r in results] == [Accepted, Accepted, UnknownOutcome]
    assert results[2].code == "FREQUENCY_LIMITED"
    assert emulator.refunds_created["R2"] == 0


def test_an_answer_signed_under_another_key_id_is_unknown_and_fetches_no_certificates(make_gateway, emulator):
    gateway = make_gateway(platform_public_key_id="PUB_KEY_ID_" + "9" * 32)

    result = gateway.apply(refund())

    assert isinstance(result, UnknownOutcome) and result.code == "BAD_SIGNATURE"
    assert emulator.requests == {("POST", 200): 1}  # no GET /v3/certificates behind our back


def _max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_paced_applies_from_several_threads_never_trip_the_limit(make_gateway, emulator):
    qps = 100
    emulator.apply_qps = 110  # WeChat's limit, a little above our pace
    gateway = make_gateway(apply_qps=qps)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: gateway.apply(refund(f"R{i}", f"O{i}")), range(300)))

    arrivals = [arrived for arrived, method, _call, _status in emulator.request_log if method == "POST"]
    assert all(isinstance(result, Accepted) for result in results)
    assert emulator.requests[("POST", 429)] == 0
    # Slots leave the client exactly 10 ms apart, but scheduling jitter (client,
    # server and GIL share one process here) can bunch a few arrivals, so a
    # single second may see slightly more than `qps`: never more than the limit.
    # The same jitter on the first arrival (new connections) skews the mean by
    # a few tens of ms over 3 s; unpaced, these calls run at 5-10x the pace.
    assert _max_in_any_second(arrivals) <= emulator.apply_qps
    assert len(arrivals) / (max(arrivals) - min(arrivals) + 1 / qps) <= qps * 1.03


# -- bounds: redirects, trickles, floods and deadlines ----------------------------------------


def vm_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class PeakRss:
    """The highest VmRSS seen while the block runs, sampled every few milliseconds."""

    def __enter__(self) -> PeakRss:
        self.before = vm_rss_mb()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, vm_rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, vm_rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak - self.before


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("call", ["apply", "query"])
def test_a_redirect_is_unknown_and_the_other_host_hears_nothing(gateway, emulator, stray_server, status, call):
    if call == "query":
        gateway.apply(refund())
    emulator.fail_next("R1", "redirect", call=call, redirect_status=status, redirect_to=stray_server.base_url)

    result = gateway.apply(refund()) if call == "apply" else gateway.query("R1")

    assert isinstance(result, UnknownOutcome) and result.code == "REDIRECT"
    assert stray_server.seen == []
    # The other host was listening all along: it would have seen a followed redirect.
    assert requests.get(stray_server.base_url + "/ping", timeout=2).status_code == 200
    assert stray_server.seen == [("GET", "/ping")]


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
def test_after_a_redirect_the_retry_moves_money_once(gateway, emulator, after_commit):
    emulator.fail_next("R1", "redirect", after_commit=after_commit)  # to 127.0.0.2, where nothing listens

    failed = gateway.apply(refund())
    retried = gateway.apply(refund())

    assert isinstance(failed, UnknownOutcome) and failed.code == "REDIRECT"
    assert isinstance(retried, Accepted)
    assert emulator.refunds_created["R1"] == 1
    assert emulator.fen_refunded["O1"] == PAID


@pytest.mark.parametrize(("deadline_in", "ends_after"), [(None, 2.0), (1.4, 1.4)], ids=["own-timeouts", "deadline"])
def test_a_trickled_answer_times_out_on_the_whole_call_not_per_read(make_gateway, emulator, deadline_in, ends_after):
    # One byte every 0.5 s never trips a 1 s read timeout; only a deadline for the whole call stops it.
    gateway = make_gateway(timeout=(1.0, 1.0))
    emulator.fail_next("R1", "trickle", after_commit=True, trickle_gap=0.5, trickle_bytes=30)
    deadline = None if deadline_in is None else time.monotonic() + deadline_in

    failed, elapsed = timed(lambda: gateway.apply(refund(), deadline=deadline and (lambda: deadline)))
    retried = gateway.apply(refund())

    assert isinstance(failed, UnknownOutcome) and failed.code == "TIMEOUT"
    assert ends_after - 0.1 <= elapsed < ends_after + 0.5, elapsed
    assert isinstance(retried, Accepted)
    assert emulator.refunds_created["R1"] == 1


def test_a_trickled_query_times_out_too(make_gateway, emulator):
    gateway = make_gateway(timeout=(1.0, 1.0))
    gateway.apply(refund())
    emulator.fail_next("R1", "trickle", call="query", after_commit=True, trickle_gap=0.5, trickle_bytes=30)

    failed, elapsed = timed(lambda: gateway.query("R1"))

    assert isinstance(failed, UnknownOutcome) and failed.code == "TIMEOUT"
    assert elapsed < 2.5, elapsed


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_a_200_mb_error_body_is_refused_without_holding_it(gateway, emulator, chunked):
    emulator.fail_next("R1", "huge", huge_status=500, huge_bytes=200_000_000, huge_chunked=chunked)

    with PeakRss() as rss:
        failed, elapsed = timed(lambda: gateway.apply(refund()))

    assert isinstance(failed, UnknownOutcome) and failed.code == "ANSWER_TOO_LARGE"
    assert failed.request_id  # the headers were read: support can still find the call
    assert rss.growth_mb < 50, rss.growth_mb
    assert elapsed < 2, elapsed
    assert isinstance(gateway.apply(refund()), Accepted)  # the client is fine, and no money moved twice
    assert emulator.refunds_created["R1"] == 1


def _self_signed_loopback_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_the_whole_call_deadline_also_cuts_a_trickling_tls_answer(tmp_path):
    # Live traffic is https: the watchdog must interrupt a read inside TLS too.
    cert_file, key_file = _self_signed_loopback_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one_trickled_answer() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                tls.sendall(bytes([byte]))
                if stop.wait(0.3):
                    return

    server = threading.Thread(target=serve_one_trickled_answer, daemon=True)
    server.start()
    session = new_session(f"https://127.0.0.1:{listener.getsockname()[1]}")
    session.verify = str(cert_file)
    started = time.monotonic()
    try:
        with pytest.raises(requests.Timeout):
            send_within(
                session,
                "get",
                url=f"https://127.0.0.1:{listener.getsockname()[1]}/v3/refund/domestic/refunds/R1",
                deadline=started + 1.5,
                timeout=(1.0, 1.0),
                max_bytes=MAX_ANSWER_BYTES,
                on_headers=lambda response: None,
            )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        session.close()
        server.join(timeout=5)
        listener.close()

    assert 1.4 <= elapsed < 2.0, elapsed


def test_a_signed_2xx_over_the_cap_is_unknown_and_the_retry_moves_money_once(gateway, emulator):
    emulator.fail_next("R1", "huge", huge_status=200, huge_bytes=5_000_000, huge_chunked=True, after_commit=True)

    failed = gateway.apply(refund())
    retried = gateway.apply(refund())

    assert isinstance(failed, UnknownOutcome) and failed.code == "ANSWER_TOO_LARGE"
    assert isinstance(retried, Accepted)
    assert emulator.refunds_created["R1"] == 1


def test_a_signed_2xx_within_the_cap_is_still_verified_and_accepted(gateway, emulator):
    gateway.apply(refund())
    emulator.fail_next(
        "R1", "huge", call="query", huge_status=200, huge_bytes=MAX_ANSWER_BYTES - 1000, after_commit=True
    )

    result = gateway.query("R1")

    assert isinstance(result, Accepted) and result.refund.out_refund_no == "R1"


@pytest.mark.parametrize("call", ["apply", "query"])
def test_a_deadline_already_past_is_not_sent_and_nothing_reaches_the_gateway(gateway, emulator, call):
    past = lambda: time.monotonic() - 1  # noqa: E731

    result = gateway.apply(refund(), deadline=past) if call == "apply" else gateway.query("R1", deadline=past)

    assert isinstance(result, NotSent) and result.code == "DEADLINE"
    assert emulator.requests == {}
    assert len(emulator.request_log) == 0


def test_with_one_pacing_slot_before_the_deadline_one_call_goes_and_the_other_books_nothing(make_gateway, emulator):
    gateway = make_gateway(apply_qps=1, min_call_seconds=0.2)
    deadline = time.monotonic() + 0.5
    start = threading.Barrier(2)

    def apply(i: int):
        start.wait()
        return gateway.apply(refund(f"R{i}", f"O{i}"), deadline=lambda: deadline)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(apply, range(2)))

    assert sorted(type(r).__name__ for r in results) == ["Accepted", "NotSent"]
    assert post_count(emulator) == 1
    # The slot after the first call's is still free: the refused call booked nothing.
    assert gateway.calls_within("apply", 0.5) == 0
    assert gateway.calls_within("apply", 1.1) == 1


def test_a_deadline_that_runs_out_during_the_pacing_wait_stops_the_call_before_it_leaves(make_gateway, emulator):
    gateway = make_gateway(apply_qps=2, min_call_seconds=0.2)
    lease_until = [time.monotonic() + 30]
    assert isinstance(gateway.apply(refund("R0", "O0")), Accepted)  # takes the current slot

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gateway.apply, refund("R1", "O1"), deadline=lambda: lease_until[0])
        # Once R1 has booked the next slot (~0.53 s away), none is left within 0.6 s.
        wait_until(
            lambda: gateway.calls_within("apply", 0.6),
            5,
            "R1 to book the next slot (none left within 0.6 s)",
            until=lambda free: free == 0,
            interval=0.002,
        )
        lease_until[0] = time.monotonic()  # the lease on R1's row runs out while it waits
        result = pending.result(timeout=5)

    assert isinstance(result, NotSent) and result.code == "DEADLINE"
    assert emulator.refunds_created["R1"] == 0
    assert post_count(emulator) == 1


def test_calls_within_counts_the_pacers_free_slots(make_gateway):
    gateway = make_gateway(apply_qps=10, query_qps=20)  # paced at 95 %: 9.5 and 19 per second
    unpaced = make_gateway(apply_qps=None, query_qps=None)

    assert gateway.calls_within("apply", 1.0) == 10  # slots at 0, 0.105 ... 0.947 s
    assert gateway.calls_within("query", 1.0) == 20
    assert gateway.calls_within("query", 0.0) == 1
    assert gateway.apply(refund()) is not None
    assert gateway.calls_within("apply", 0.0) == 0  # the next apply slot is ~0.1 s away
    assert unpaced.calls_within("apply", 1.0) is None
    with pytest.raises(ValueError):
        gateway.calls_within("refund", 1.0)


def test_a_forced_status_contradicts_earlier_answers_for_good(gateway, emulator, emulator_clock):
    gateway.apply(refund())
    emulator_clock.advance(1)
    assert gateway.query("R1").refund.status == "SUCCESS"

    emulator.force_status("R1", "CLOSED")
    emulator_clock.advance(3600)
    later = gateway.query("R1")

    assert isinstance(later, Accepted) and later.refund.status == "CLOSED"
    assert later.refund.success_time is None
    assert emulator.fen_refunded["O1"] == 0


def test_max_in_flight_counts_concurrent_queries_of_one_number(gateway, emulator):
    gateway.apply(refund())
    emulator.fail_next("R1", "slow", call="query", after_commit=True, slow_seconds=0.5)

    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(gateway.query, "R1")
        assert emulator.wait_for(lambda: emulator.in_flight("R1") == 1, timeout=2)
        fast = gateway.query("R1")
        assert isinstance(slow.result(timeout=5), Accepted) and isinstance(fast, Accepted)

    assert emulator.max_in_flight["R1"] == 2
    assert emulator.in_flight("R1") == 0


# -- the emulator's own checks, with hand-made requests -------------------------------------


def _authorization(keys, method: str, path: str, body: str, timestamp: int, sign_body: str | None = None) -> str:
    private_key = serialization.load_pem_private_key(keys.merchant_private_key_pem.encode(), password=None)
    nonce = "NONCE123"
    message = f"{method}\n{path}\n{timestamp}\n{nonce}\n{body if sign_body is None else sign_body}\n"
    signature = b64encode(private_key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
    return (
        f'WECHATPAY2-SHA256-RSA2048 mchid="{keys.mchid}",nonce_str="{nonce}",signature="{signature}",'
        f'timestamp="{timestamp}",serial_no="{keys.merchant_serial_no}"'
    )


def _raw_apply(emulator, keys, timestamp: int, sign_body: str | None = None) -> requests.Response:
    body = '{"out_refund_no":"RAW1","out_trade_no":"O1","amount":{"refund":1,"total":1,"currency":"CNY"}}'
    headers = {
        "Content-Type": "application/json",
        "Authorization": _authorization(keys, "POST", REFUNDS_PATH, body, timestamp, sign_body),
    }
    return requests.post(emulator.base_url + REFUNDS_PATH, data=body.encode(), headers=headers, timeout=2)


def _verify_answer(keys, response: requests.Response) -> None:
    public_key = serialization.load_pem_public_key(keys.platform_public_key_pem.encode())
    h = response.headers
    message = f"{h['Wechatpay-Timestamp']}\n{h['Wechatpay-Nonce']}\n{response.text}\n".encode()
    public_key.verify(b64decode(h["Wechatpay-Signature"]), message, padding.PKCS1v15(), hashes.SHA256())
    assert h["Wechatpay-Serial"] == keys.platform_public_key_id
    assert h["Request-ID"]


def test_a_correctly_signed_hand_made_request_is_accepted(emulator, key_material):
    response = _raw_apply(emulator, key_material, int(time.time()))

    assert response.status_code == 200
    _verify_answer(key_material, response)


def test_the_emulator_refuses_a_stale_timestamp_with_a_signed_sign_error(emulator, key_material):
    response = _raw_apply(emulator, key_material, int(time.time()) - 301)

    assert (response.status_code, response.json()["code"]) == (401, "SIGN_ERROR")
    _verify_answer(key_material, response)
    assert emulator.refunds_created["RAW1"] == 0


def test_the_emulator_refuses_a_signature_over_another_body(emulator, key_material):
    response = _raw_apply(emulator, key_material, int(time.time()), sign_body="{}")

    assert (response.status_code, response.json()["code"]) == (401, "SIGN_ERROR")
    assert emulator.refunds_created["RAW1"] == 0


def test_a_tampered_answer_fails_verification_by_hand_too(emulator, key_material):
    emulator.fail_next("RAW1", "bad_signature", after_commit=True)

    response = _raw_apply(emulator, key_material, int(time.time()))

    assert response.status_code == 200
    with pytest.raises(InvalidSignature):
        _verify_answer(key_material, response)


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_reaches_logs_or_reprs(gateway, emulator, key_material):
    lines: list[str] = []
    lock = threading.Lock()

    def sink(message) -> None:
        with lock:
            lines.append(str(message) + repr(message.record["extra"]))

    sink_id = logger.add(sink, level="DEBUG")
    try:
        emulator.fail_next("R2", "500")
        gateway.apply(refund())
        gateway.apply(refund("R2", "O2"))
        gateway.query("R1")
        gateway.query("NOPE")
    finally:
        logger.remove(sink_id)
    private_key_body = key_material.merchant_private_key_pem.splitlines()[1]
    everything = "\n".join(lines) + repr(gateway) + repr(key_material)

    assert len(lines) >= 4
    for secret in (
        key_material.apiv3_key,
        private_key_body,
        "PRIVATE KEY",
        "WECHATPAY2-SHA256-RSA2048 mchid",
        'signature="',
    ):
        assert secret not in everything


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        (dict(base_url="http://api.example.com"), "https"),
        (dict(notify_url="https://shop.example.com/notify?x=1"), "query"),
        (dict(apiv3_key="short"), "32 bytes"),
        (dict(merchant_private_key_pem="-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----"), "PEM"),
    ],
)
def test_a_misconfigured_gateway_fails_at_construction_without_echoing_secrets(key_material, overrides, complaint):
    params = {"base_url": "https://api.mch.weixin.qq.com", **overrides}
    with pytest.raises(ValueError) as raised:
        build_gateway(key_material, **params)

    assert complaint in str(raised.value)
    assert "SECRETSTUFF" not in str(raised.value) and raised.value.__cause__ is None


# -- the `emulator` command's entry point ----------------------------------------------------------


def test_the_emulator_command_prints_where_things_are_and_stops_cleanly_on_sigterm(tmp_path):
    key_dir = tmp_path / "keys"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from cancel_scanner.gateway.emulator.command import serve; sys.exit(serve(key_dir={str(key_dir)!r}))",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(8)]
        facts = dict(line.split(" ", 1) for line in lines)
        base_url = facts["listening"].removeprefix("on ")
        answer = requests.get(base_url + REFUNDS_PATH + "/R1", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=10)

    assert returncode == 0
    assert answer.status_code == 401  # unsigned
    apiv3_key_file = Path(facts["apiv3_key_file"])
    for path in (apiv3_key_file, Path(facts["merchant_private_key_file"]), Path(facts["platform_public_key_file"])):
        assert path.parent == key_dir
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert apiv3_key_file.read_text() not in "\n".join(lines)
    assert "PRIVATE KEY" not in "\n".join(lines)
