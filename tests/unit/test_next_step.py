"""The one rule both drivers (the daemon's stage loop, run_until_idle) follow after a batch."""

from __future__ import annotations

import pytest

from cancel_scanner.engine.batch import (
    MAX_LOST_IN_A_ROW,
    MAX_PACED_SECONDS,
    PACED_WAIT_SECONDS,
    Again,
    Backoff,
    BatchReport,
    Blocked,
    Fail,
    Idle,
    Lost,
    Paced,
    Rest,
    Streak,
    Worked,
    next_step,
)


def test_a_full_batch_goes_again_at_once_and_a_partial_or_empty_one_rests():
    assert next_step(Worked(full=True), Streak()) == (Again(), Streak())
    assert next_step(Worked(full=False), Streak(lost=3)) == (Rest(), Streak())
    assert next_step(Idle(), Streak(paced=7)) == (Rest(), Streak())


def test_a_lost_race_looks_again_at_once_until_too_many_in_a_row_count_as_a_failure():
    streak = Streak()
    for n in range(1, MAX_LOST_IN_A_ROW + 1):
        step, streak = next_step(Lost("1213 deadlock"), streak)
        assert step == Again() and streak.lost == n
    step, streak = next_step(Lost("1213 deadlock"), streak)
    assert isinstance(step, Fail) and not step.blocked and f"lost {MAX_LOST_IN_A_ROW + 1} races in a row" in step.reason
    assert streak == Streak()


def test_a_paced_batch_looks_again_soon_and_fails_only_after_a_minute_of_no_free_slot():
    streak = Streak()
    tries = int(MAX_PACED_SECONDS / PACED_WAIT_SECONDS)
    for _ in range(tries):
        step, streak = next_step(Paced(), streak)
        assert step == Again(after=PACED_WAIT_SECONDS)
    step, streak = next_step(Paced(), streak)
    assert isinstance(step, Fail) and "no free call slot" in step.reason


def test_work_between_lost_races_starts_the_count_again():
    _, streak = next_step(Lost("x"), Streak(lost=MAX_LOST_IN_A_ROW))
    assert streak == Streak()  # that was the failure
    _, streak = next_step(Lost("x"), Streak(lost=MAX_LOST_IN_A_ROW - 1))
    _, streak = next_step(Worked(full=True), streak)
    assert next_step(Lost("x"), streak)[0] == Again()


@pytest.mark.parametrize(
    "result, blocked", [(Backoff("2013 lost connection"), False), (Blocked("UPDATE command denied"), True)]
)
def test_a_database_failure_backs_off_and_a_blocked_environment_says_a_person_must_fix_it(result, blocked):
    step, _ = next_step(result, Streak())
    assert step == Fail(result.reason, blocked=blocked)


def test_a_report_settles_to_worked_full_only_when_it_got_all_it_asked_for_and_sent_every_call():
    report = BatchReport(stage="s", batch_size=10, claimed=10, done=10)
    report.settle()
    assert report.result == Worked(full=True) and report.full
    skipped = BatchReport(stage="s", batch_size=10, claimed=10, done=9, skipped=1)
    skipped.settle()
    assert skipped.result == Worked(full=False)
    blocked = BatchReport(stage="s", batch_size=10, claimed=10, row_blocked="SIGN_ERROR")
    blocked.settle()
    assert blocked.blocked == "SIGN_ERROR"
    empty = BatchReport(stage="s", batch_size=10)
    empty.settle()
    assert empty.result == Idle() and not empty.full
