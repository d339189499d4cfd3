"""The record of money is never more certain than what WeChat proved. SQLite and MariaDB, the real
client over HTTP to the emulator.

Each test attacks one way the flow could lose the truth: a refusal after an accepted first call, a
redirect, answers that stay unknown, WeChat contradicting itself, a runner paused past its lease, a
process that goes silent, and a pacer too slow for the batch."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from cancel_scanner.engine.runner import Hooks
from cancel_scanner.gateway.sandbox import client_for
from cancel_scanner.scanners.intake import out_refund_no_for
from tests.flow import add_goods, add_order, refunds, request_cancel, row, rows, scalar


@dataclass
class Monotonic:
    """A runner's monotonic clock that a test moves: a pause without waiting for it."""

    offset: float = 0.0

    def __call__(self) -> float:
        import time

        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def cancelled(world, order_id: int, **order) -> str:
    add_goods(world.db, order_id, stock=10, sales=10)
    add_order(world.db, order_id, goods_id=order_id, **order)
    request_cancel(world.db, order_id)
    world.runner().run_stage("intake", world.clock.now)
    return out_refund_no_for(order_id)


def submit(world, runner=None):
    runner = runner or world.runner()
    try:
        return runner.run_stage("submit_refund", world.clock.now)
    finally:
        runner.close()


def submit_every_attempt(world) -> None:
    """submit_refund run once more than its max_attempts, a minute apart: every retry a row has, and one beyond."""
    runner = world.runner()
    for _ in range(world.config.job("submit_refund").max_attempts + 1):
        runner.run_stage("submit_refund", world.clock.now)
        world.clock.advance(60)
    runner.close()


def submit_row(world, order_id: int):
    return refunds(world.db)[order_id]


def apply_calls(world) -> int:
    return sum(n for (method, _status), n in world.emulator.requests.items() if method == "POST")


# --- 1. unknown stays unknown --------------------------------------------------------------------


def test_a_sign_error_after_an_accepted_first_call_keeps_the_refund_pending_and_blocks_the_stage(world):
    number = cancelled(world, 701)
    world.emulator.fail_next(number, "503", after_commit=True)  # WeChat took it; we heard 503
    assert submit(world).retried == 1
    world.emulator.fail_next(number, "sign_error")  # e.g. this host's clock 10 minutes fast
    world.clock.advance(5)

    report = submit(world)

    assert report.blocked and "SIGN_ERROR" in report.blocked and report.failed == 0
    refund = submit_row(world, 701)
    assert (refund["submit_scanned"], refund["submit_success"], refund["attempts"]) == (0, 0, 1)
    assert refund["last_error"].startswith("SIGN_ERROR") and refund["lease_owner"] is None
    world.settle()
    assert world.emulator.refunds_created[number] == 1
    assert row(world.db, "goods_order2", 701)["refund_status"] == "REFUNDED"


def test_a_refusal_of_a_number_that_may_have_reached_wechat_is_checked_and_the_refund_recorded(world):
    number = cancelled(world, 702)
    world.emulator.fail_next(number, "503", after_commit=True)
    submit(world)
    world.emulator.fail_next(number, "invalid_request")  # a refusal that is a lie: the money moved
    world.clock.advance(5)

    report = submit(world)

    assert report.done == 1
    refund = submit_row(world, 702)
    assert (refund["submit_scanned"], refund["submit_success"]) == (1, 1)
    assert refund["wx_refund_id"] == world.emulator.refund_id(number)
    world.settle()
    assert world.emulator.refunds_created[number] == 1
    assert row(world.db, "goods_order2", 702)["refund_status"] == "REFUNDED"


def test_a_first_call_refusal_is_final_but_a_refusal_after_an_unknown_answer_is_only_retried(world):
    first = cancelled(world, 703)
    world.emulator.fail_next(first, "invalid_request")  # the very first call: a proven refusal
    second = cancelled(world, 704)
    world.emulator.fail_next(second, "500")  # an unknown outcome (WeChat happened to record nothing)
    submit(world)
    world.emulator.fail_next(second, "invalid_request")
    world.clock.advance(5)
    submit(world)

    refused = submit_row(world, 703)
    assert (refused["submit_scanned"], refused["submit_success"]) == (1, 0)
    assert refused["last_error"].startswith("INVALID_REQUEST")
    # "No such refund" from the query is not proof (WeChat's replication lags an acceptance):
    # the row is asked again with the same number, and here the next apply goes through.
    unsure = submit_row(world, 704)
    assert (unsure["submit_scanned"], unsure["submit_success"], unsure["attempts"]) == (0, 0, 2)
    assert unsure["last_error"].startswith("INVALID_REQUEST") and "RESOURCE_NOT_EXISTS" in unsure["last_error"]
    world.settle()
    assert world.emulator.refunds_created[first] == 0 and world.emulator.refunds_created[second] == 1
    assert row(world.db, "goods_order2", 704)["refund_status"] == "REFUNDED"


def test_a_redirect_is_never_followed_and_the_number_is_queried_at_once(world):
    """Issue 23, item 6: a persistent 302 on apply (the refund created at WeChat) is resolved by one
    query, not by re-applying until the row is given up as unknown."""
    number = cancelled(world, 705)
    world.emulator.fail_next(number, "redirect", times=1000, after_commit=True)  # accepted, then answered 302

    assert submit(world).done == 1
    refund = submit_row(world, 705)
    assert (refund["submit_scanned"], refund["submit_success"], refund["last_error"]) == (1, 1, None)
    assert refund["wx_refund_id"] and apply_calls(world) == 1 and world.emulator.requests[("GET", 200)] == 1
    world.settle()
    assert world.emulator.refunds_created[number] == 1
    assert row(world.db, "goods_order2", 705)["refund_status"] == "REFUNDED"


def test_an_unknown_outcome_is_queried_before_the_row_is_given_up(world):
    """Timeouts and 5xx are re-applied with the same number; the last try asks WeChat's record first."""
    number = cancelled(world, 708)
    world.emulator.fail_next(number, "503", times=1000, after_commit=True)  # created at the first apply
    submit_every_attempt(world)

    refund = submit_row(world, 708)
    assert (refund["submit_scanned"], refund["submit_success"], refund["last_error"]) == (1, 1, None)
    assert world.emulator.refunds_created[number] == 1
    assert world.emulator.requests[("GET", 200)] == 1  # one query, on the last try
    assert apply_calls(world) == world.config.job("submit_refund").max_attempts


def test_a_number_whose_answers_stay_unknown_ends_outcome_unknown_never_rejected(world):
    """Only when the queries cannot tell either (they fail too) does a row end OUTCOME_UNKNOWN."""
    number = cancelled(world, 706)
    world.emulator.fail_next(number, "503", times=1000, after_commit=True, call="any")
    submit_every_attempt(world)

    refund = submit_row(world, 706)
    assert (refund["submit_scanned"], refund["submit_success"]) == (1, 0)
    assert refund["last_error"].startswith("OUTCOME_UNKNOWN") and "gave up" in refund["last_error"]
    assert row(world.db, "goods_order2", 706)["refund_status"] == "REFUNDING"


def test_success_then_processing_then_closed_is_a_conflict_for_a_person_never_no_money_moved(world):
    number = cancelled(world, 707)
    world.emulator.fail_next(number, "503", after_commit=True)
    submit(world)
    world.emulator.force_status(number, "SUCCESS")  # the replay's verified answer says SUCCESS
    world.clock.advance(5)
    submit(world)
    assert submit_row(world, 707)["wx_status"] == "SUCCESS"
    world.emulator.force_status(number, "PROCESSING")  # and then WeChat says otherwise
    runner = world.runner()
    runner.run_until_idle(world.clock.now.replace(year=world.clock.now.year + 1))
    runner.close()

    refund = submit_row(world, 707)
    assert (refund["progress_scanned"], refund["progress_success"]) == (1, 0)
    assert refund["last_error"].startswith("CONFLICTING_ANSWERS")
    assert (refund["sync_scanned"], refund["sync_success"]) == (1, 0)
    order = row(world.db, "goods_order2", 707)
    assert (order["refund_status"], order["stock_scanned"]) == ("REFUNDING", 0)  # not "FAILED, no money moved"
    assert "REFUND_FAILED" not in {r["event"] for r in rows(world.db, "SELECT event FROM goods_order2_oplog")}


# --- 3. a lease bounds the whole call ---------------------------------------------------------------


def test_a_runner_paused_past_its_lease_sends_nothing_when_it_resumes(world, db_url):
    from tests.flow import test_config

    # A lease shorter than the heartbeat window: here only the lease can stop the calls.
    world.config = test_config(db_url, jobs={"submit_refund": {"lease_seconds": 7}}, takeover_seconds=10)
    assert world.config.takeover_seconds - 1.5 > 7 + 1
    for order_id in range(711, 716):
        cancelled(world, order_id)
    monotonic = Monotonic()
    paused = world.runner(hooks=Hooks(after_lease=lambda stage, ids: monotonic.advance(7 + 1)), monotonic=monotonic)

    report = submit(world, paused)

    assert (report.skipped, report.done, report.retried) == (5, 0, 0)
    assert apply_calls(world) == 0
    left = rows(world.db, "SELECT submit_sent, attempts, lease_owner FROM refund_order")
    assert {(r["submit_sent"], r["attempts"], r["lease_owner"]) for r in left} == {(0, 0, None)}
    world.settle()
    assert sum(world.emulator.refunds_created.values()) == 5


def test_leases_only_as_many_rows_as_the_pace_can_send_and_two_slow_processes_both_progress(world, db_url):
    from tests.flow import test_config

    config = test_config(db_url, takeover_seconds=3, heartbeat_seconds=1)
    for order_id in range(721, 751):
        cancelled(world, order_id)
    keys = world.sandbox.keys
    gateways = [client_for(keys, world.emulator.base_url, apply_qps=10, timeout=(2, 2)) for _ in range(2)]
    world.config = config
    runners = [world.runner(owner=f"slow-{i}", gateway=g) for i, g in enumerate(gateways)]
    reports: list = []

    def drain(runner) -> None:
        # run --once's loop: a batch the shared pace (10 QPS for the two) left empty is not idleness.
        runner.on_batch = lambda report, _seconds: reports.append(report)
        runner.run_until_idle(world.clock.now, stages=["submit_refund"])

    threads = [threading.Thread(target=drain, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in runners:
        r.close()
    for g in gateways:
        g.close()

    # A heartbeat window of 1.5 s at 10 QPS: a handful of rows a lease, nearly all of them sent (a row
    # not sent goes back at once, without an attempt; under heavy load a slot may slip past its window).
    assert max(r.claimed for r in reports) <= 10
    assert sum(r.skipped for r in reports) <= 2
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1") == 30
    assert set(world.emulator.refunds_created.values()) == {1}
    assert max(world.emulator.max_in_flight.values()) == 1
    assert {r.stage for r in reports} == {"submit_refund"} and all(not r.error for r in reports)


# --- 4. fast takeover ------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for kill -9 between the lease and the calls: nothing after it runs."""


def test_the_work_of_a_silent_process_is_taken_over_after_takeover_seconds_not_after_its_lease(world):
    for order_id in range(761, 766):
        cancelled(world, order_id)

    def die(stage, ids):
        raise Killed

    dead = world.runner(owner="dead", hooks=Hooks(after_lease=die))
    with pytest.raises(Killed):
        dead.run_stage("submit_refund", world.clock.now)
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner = 'dead'") == 5
    lease = world.config.job("submit_refund").lease_seconds
    takeover = world.config.takeover_seconds
    assert takeover + 1 < lease

    survivor = world.runner(owner="survivor")
    world.clock.advance(takeover - 1)
    assert submit(world, survivor).claimed == 0  # not silent long enough yet
    world.clock.advance(2)
    survivor = world.runner(owner="survivor-2")
    report = submit(world, survivor)

    assert report.done == 5
    assert scalar(world.db, "SELECT COUNT(*) FROM cancel_scanner_process WHERE owner = 'dead'") == 0
    assert set(world.emulator.refunds_created.values()) == {1}

    # The "dead" one was only paused: it comes back, finds it lost its place, and goes on as someone new.
    dead.registry.beat()
    assert dead.owner != "dead"


def test_a_paused_process_that_comes_back_after_a_takeover_drops_its_answer_and_sends_no_more(world, db_url):
    from tests.flow import test_config

    world.config = test_config(db_url, jobs={"submit_refund": {"concurrency": 1}})
    for order_id in range(771, 774):
        cancelled(world, order_id)
    takeover = world.config.takeover_seconds
    monotonic = Monotonic()
    paused_once = []

    def paused_after_its_first_answer(stage, row, result):
        if paused_once:
            return
        paused_once.append(row.id)
        world.clock.advance(takeover + 1)
        monotonic.advance(takeover + 1)
        assert submit(world, world.runner(owner="other")).done == 3  # the survivor took all three over

    paused = world.runner(
        owner="paused", hooks=Hooks(after_gateway_call=paused_after_its_first_answer), monotonic=monotonic
    )
    report = submit(world, paused)

    assert (report.done, report.claimed) == (0, 0)  # its one answer dropped, its other two calls never sent
    assert apply_calls(world) == 1 + 3
    assert set(world.emulator.refunds_created.values()) == {1}
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1 AND lease_owner IS NULL") == 3


class CrashingClient:
    """The real client, except that it raises for one number after sending it: a bug in the client."""

    def __init__(self, real, number: str):
        self.real, self.number = real, number

    def apply(self, req, *, deadline=None):
        result = self.real.apply(req, deadline=deadline)
        if req.out_refund_no == self.number:
            raise RuntimeError("client bug after the bytes left")
        return result

    def query(self, out_refund_no, *, deadline=None):
        return self.real.query(out_refund_no, deadline=deadline)

    def calls_within(self, endpoint, seconds):
        return self.real.calls_within(endpoint, seconds)


def test_a_client_that_raises_loses_no_other_answer_and_its_row_ends_outcome_unknown(world, db_url):
    from tests.flow import test_config

    world.config = test_config(db_url, jobs={"submit_refund": {"max_attempts": 2, "retry_delays_seconds": [1]}})
    numbers = [cancelled(world, order_id) for order_id in range(781, 786)]
    crashing = CrashingClient(world.sandbox.gateway, numbers[0])

    first = submit(world, world.runner(gateway=crashing))
    world.clock.advance(5)
    second = submit(world, world.runner(gateway=crashing))

    assert (first.done, first.retried) == (4, 1)
    assert second.failed == 1
    crashed = submit_row(world, 781)
    assert (crashed["submit_scanned"], crashed["submit_success"], crashed["lease_owner"]) == (1, 0, None)
    assert crashed["last_error"].startswith("OUTCOME_UNKNOWN")  # WeChat did take it: never "rejected"
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1") == 4


def test_without_a_heartbeat_nothing_is_leased_and_the_stage_says_why(world):
    for order_id in range(791, 794):
        cancelled(world, order_id)
    with world.db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE cancel_scanner_process")  # a half-done upgrade

    report = submit(world)

    assert report.blocked and "cancel_scanner_process" in report.blocked
    assert apply_calls(world) == 0
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner IS NOT NULL OR attempts > 0") == 0
