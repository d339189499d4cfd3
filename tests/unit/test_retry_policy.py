"""The retry policy and the polling schedule are pure functions of their inputs."""

from __future__ import annotations

from datetime import datetime, timedelta

from cancel_scanner.engine.config import JobConfig
from cancel_scanner.engine.outcome import Retry
from cancel_scanner.engine.retry import GiveUp, RetryAt, decide
from cancel_scanner.scanners.intake import out_refund_no_for, wechat_reason
from cancel_scanner.scanners.poll_refund import next_poll_at

NOW = datetime(2026, 11, 22, 8, 0, 0)
JOB = JobConfig(name="submit_refund", max_attempts=4, retry_delays_seconds=(5, 30, 120))
TIMEOUT = Retry("TIMEOUT", "read timed out")


def test_backoff_follows_the_list_and_its_last_value_repeats():
    assert decide(TIMEOUT, 0, NOW, JOB) == RetryAt(NOW + timedelta(seconds=5), 1)
    assert decide(TIMEOUT, 1, NOW, JOB) == RetryAt(NOW + timedelta(seconds=30), 2)
    assert decide(TIMEOUT, 2, NOW, JOB) == RetryAt(NOW + timedelta(seconds=120), 3)


def test_after_max_attempts_the_row_gives_up_with_the_reason():
    decision = decide(TIMEOUT, 3, NOW, JOB)
    assert isinstance(decision, GiveUp)
    assert decision.reason.startswith("TIMEOUT: read timed out")
    assert "4 attempts" in decision.reason


def test_an_error_with_a_tighter_cap_gives_up_sooner():
    not_found = Retry("RESOURCE_NOT_EXISTS", "no such order yet", give_up_after=2)
    assert isinstance(decide(not_found, 0, NOW, JOB), RetryAt)
    assert isinstance(decide(not_found, 1, NOW, JOB), GiveUp)


def test_polls_follow_the_schedule_from_acceptance_then_repeat_the_last_delay():
    delays = (60, 300, 600)
    accepted = NOW
    assert next_poll_at(accepted, accepted, delays) == accepted + timedelta(seconds=60)
    assert next_poll_at(accepted, accepted + timedelta(seconds=60), delays) == accepted + timedelta(seconds=360)
    assert next_poll_at(accepted, accepted + timedelta(seconds=400), delays) == accepted + timedelta(seconds=960)
    late = accepted + timedelta(hours=5)
    assert next_poll_at(accepted, late, delays) == late + timedelta(seconds=600)


def test_refund_numbers_are_deterministic_and_safe_for_the_signed_path():
    assert out_refund_no_for(42) == out_refund_no_for(42)
    assert out_refund_no_for(42) != out_refund_no_for(43)
    assert all(c.isalnum() or c in "-_" for c in out_refund_no_for(9_223_372_036_854_775_807))


def test_refund_reason_is_cut_to_80_bytes_on_a_character_boundary():
    reason = wechat_reason("商品缺货" * 20, "MERCHANT")
    assert len(reason.encode("utf-8")) <= 80
    assert reason == "商品缺货" * 6 + "商品"  # 26 characters, 78 bytes
    assert wechat_reason("  ", "USER") == "user cancelled the order"
