"""Outcome to flag flip, without a database: the contract's flag table, row by row."""

from __future__ import annotations

from datetime import datetime, timedelta

from cancel_scanner.engine.flips import flip_for
from cancel_scanner.engine.outcome import Blocked, Done, Failed, Later, Retry
from cancel_scanner.scanners.restore_stock import RestoreStock
from tests.flow import test_config

NOW = datetime(2026, 11, 1, 12, 0, 0)
STAGE = RestoreStock()
JOB = test_config("sqlite://", jobs={"restore_stock": {"max_attempts": 3, "retry_delays_seconds": [5, 60]}}).job(
    "restore_stock"
)


def test_done_is_one_one_and_clears_the_retry_columns():
    assert flip_for(STAGE, JOB, Done(), 2, NOW)[1] == {
        "stock_scanned": 1,
        "stock_success": 1,
        "stock_attempts": 0,
        "stock_next_attempt_at": None,
        "stock_last_error": None,
    }


def test_failed_is_one_zero_with_its_reason():
    final, values = flip_for(STAGE, JOB, Failed("GOODS_NOT_FOUND", "goods 7 does not exist"), 0, NOW)
    assert (values["stock_scanned"], values["stock_success"]) == (1, 0)
    assert values["stock_last_error"] == "GOODS_NOT_FOUND: goods 7 does not exist"


def test_a_retry_counts_an_attempt_until_the_policy_gives_up_with_its_give_up_code():
    retry = Retry("TIMEOUT", "no answer", give_up_code="OUTCOME_UNKNOWN")
    _, first = flip_for(STAGE, JOB, retry, 0, NOW)
    assert first == {
        "stock_attempts": 1,
        "stock_next_attempt_at": NOW + timedelta(seconds=5),
        "stock_last_error": "TIMEOUT: no answer",
    }
    _, second = flip_for(STAGE, JOB, retry, 1, NOW)
    assert second["stock_next_attempt_at"] == NOW + timedelta(seconds=60)
    final, last = flip_for(STAGE, JOB, retry, 2, NOW)
    assert isinstance(final, Failed) and final.code == "OUTCOME_UNKNOWN"
    assert (last["stock_scanned"], last["stock_success"]) == (1, 0) and "gave up after 3 attempts" in last[
        "stock_last_error"
    ]


def test_later_and_blocked_spend_no_attempt():
    _, later = flip_for(STAGE, JOB, Later(NOW + timedelta(seconds=1), "GOODS_BUSY: held"), 4, NOW)
    assert later == {
        "stock_attempts": 0,
        "stock_next_attempt_at": NOW + timedelta(seconds=1),
        "stock_last_error": "GOODS_BUSY: held",
    }
    _, blocked = flip_for(STAGE, JOB, Blocked("SIGN_ERROR", "credentials refused"), 4, NOW)
    assert blocked == {"stock_last_error": "SIGN_ERROR: credentials refused"}
