"""The alert rules' decisions: when a subject fires, when it resolves, and how often people hear of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

from cancel_scanner.alerts.rules import AlertBook, CallWindow, Reading
from cancel_scanner.config import parse_config
from cancel_scanner.engine.status import StageStatus, Status
from cancel_scanner.scanners import REGISTRY
from tests.gateway_fixtures import FakeClock

T = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def snapshot(*stages: StageStatus, abnormal: int = 0, facts: int = 0, leader: bool = True):
    counts = (("abnormal_refunds", "ABNORMAL refunds", abnormal), ("channel_facts_open", "channel facts", facts))
    status = Status(
        now=T.replace(tzinfo=None), stages=stages, counts=counts, counted_by=(("abnormal_refunds", "poll_refund"),)
    )
    return SimpleNamespace(status=status, leader=leader)


def stage(name: str, *, failed: int = 0, oldest: float | None = None, pending: int = 0) -> StageStatus:
    return StageStatus(stage=name, pending=pending, waiting=0, failed=failed, oldest_pending_seconds=oldest)


class World:
    def __init__(self, cooldown: float = 600, **rules) -> None:
        self.clock = FakeClock(1_000.0)
        self.calls = CallWindow(600, clock=self.clock)
        self.sent: list = []
        # As the daemon gets them: jobs.yaml's rules over the stages' own thresholds (parse_config).
        effective = parse_config({"alerts": {"rules": rules}}, REGISTRY, env={}).alerts.rules
        self.book = AlertBook(
            rules=effective, cooldown_seconds=cooldown, send=self.sent.append, clock=self.clock, wall=lambda: T
        )

    def read(self, snap=None, *, down=None, offset=None):
        return self.book.evaluate(
            Reading(
                snapshot=snap,
                calls=self.calls,
                down=down or {},
                clock_offset=offset,
                host="h:1",
                routine_stages=frozenset({"intake"}),
            )
        )

    def answers(self, outcome: str, n: int) -> None:
        for _ in range(n):
            self.calls.record(outcome)

    def states(self) -> list[tuple[str, str, str | None]]:
        return [(a.rule, a.state, a.stage) for a in self.sent]


def test_the_failure_rate_fires_once_over_its_threshold_with_enough_calls_and_resolves_once_calls_succeed():
    w = World(gateway_failure_rate={"threshold": 0.5, "window_seconds": 60, "min_calls": 10})
    w.answers("retry_later", 6)
    w.read()
    assert w.sent == []  # 6 of 6 failed, but fewer than min_calls: no alert on so little evidence
    w.answers("unknown", 4)
    w.answers("ok", 2)
    w.read()
    w.read()  # still firing: no second message
    assert w.states() == [("gateway_failure_rate", "firing", None)]
    assert w.sent[0].value == round(10 / 12, 4)
    w.answers("ok", 20)  # 10 of 32 failed: under the threshold
    w.read()
    assert w.states()[-1] == ("gateway_failure_rate", "resolved", None)
    assert len(w.sent) == 2


def test_permanent_answers_are_answers_not_failures():
    w = World(gateway_failure_rate={"threshold": 0.5, "window_seconds": 60, "min_calls": 3})
    w.answers("permanent", 10)  # e.g. NOT_ENOUGH: WeChat answered, and the row fails for good
    w.read()
    assert w.sent == []


def test_failures_that_leave_the_window_resolve_the_alert_even_without_new_calls():
    w = World(gateway_failure_rate={"threshold": 0.5, "window_seconds": 60, "min_calls": 3})
    w.answers("retry_later", 5)
    w.read()
    w.clock.advance(30)
    w.read()  # still inside the window
    assert w.states() == [("gateway_failure_rate", "firing", None)]
    w.clock.advance(61)
    w.read()  # a whole window without a failure (and without calls)
    assert w.states()[-1] == ("gateway_failure_rate", "resolved", None)


def test_a_subject_flapping_within_the_cooldown_costs_two_messages_not_more():
    w = World(cooldown=600, rows_failed={"threshold": 1})
    for _ in range(5):
        w.read(snapshot(stage("submit_refund", failed=1)))
        w.clock.advance(10)
        w.read(snapshot(stage("submit_refund", failed=0)))
        w.clock.advance(10)
    assert w.states() == [("rows_failed", "firing", "submit_refund"), ("rows_failed", "resolved", "submit_refund")]
    w.clock.advance(600)  # the cooldown has passed: a new spell is news again
    w.read(snapshot(stage("submit_refund", failed=2)))
    assert w.states()[-1] == ("rows_failed", "firing", "submit_refund") and w.sent[-1].value == 2


def test_database_rules_speak_only_through_the_leader_and_ignore_routine_rejections():
    w = World()
    w.read(snapshot(stage("intake", failed=40), stage("sync_result", failed=3), abnormal=2, leader=False))
    assert w.sent == []  # another daemon speaks for the database
    w.read(snapshot(stage("intake", failed=40), stage("sync_result", failed=3), abnormal=2))
    assert sorted(w.states()) == [
        ("abnormal_refunds", "firing", "poll_refund"),
        ("rows_failed", "firing", "sync_result"),
    ]
    w.read(None)  # the database could not be read: nothing resolves on no evidence
    assert len(w.sent) == 2


def test_oldest_pending_has_per_stage_thresholds():
    w = World()
    w.read(snapshot(stage("poll_refund", oldest=2 * 86_400), stage("intake", oldest=901)))
    assert w.states() == [("oldest_pending", "firing", "intake")]  # a refund to a bank card may take days


def test_a_stage_down_long_enough_fires_and_resolves_when_it_runs_again():
    w = World(stage_down={"for_seconds": 120})
    w.read(down={"submit_refund": (60.0, "OperationalError")})
    assert w.sent == []
    w.read(down={"submit_refund": (121.0, "OperationalError")})
    assert w.states() == [("stage_down", "firing", "submit_refund")]
    assert "OperationalError" in w.sent[0].summary and "h:1" in w.sent[0].summary
    w.read(down={})
    assert w.states()[-1] == ("stage_down", "resolved", "submit_refund")


def test_sign_errors_and_a_skewed_clock_are_configuration_alerts():
    w = World(config_error={"window_seconds": 60, "clock_skew_seconds": 60})
    w.answers("ok", 50)
    w.answers("config_error", 1)
    w.read(offset=-75.0)
    assert sorted(w.states()) == [("config_error", "firing", None)] * 2
    assert {a.value for a in w.sent} == {1, -75.0}


def test_a_disabled_rule_never_fires():
    w = World(rows_failed={"enabled": False})
    w.read(snapshot(stage("sync_result", failed=3)))
    assert w.sent == []


def test_reconciliation_alerts_on_differences_and_on_a_day_not_reconciled_by_the_deadline():
    beijing = timezone(timedelta(hours=8))
    w = World()

    def read(reconcile, hour):
        snap = snapshot()
        snap.status = Status(now=T.replace(tzinfo=None), stages=(), counts=(), reconcile=reconcile)
        return w.book.evaluate(
            Reading(
                snapshot=snap,
                calls=w.calls,
                down={},
                clock_offset=None,
                host="h:1",
                beijing_now=datetime(2026, 12, 2, hour, 0, tzinfo=beijing),
                reconcile_expected=True,
            )
        )

    read(None, 11)
    assert w.sent == []  # before the deadline nobody expects it done
    read(None, 18)
    assert w.states() == [("reconcile", "firing", None)] and "2026-12-01" in w.sent[0].summary
    read({"bill_date": "2026-12-01", "state": "DIFFERS", "diffs": 3, "last_error": None}, 18)
    assert w.states()[1:] == [
        ("reconcile", "firing", None),
        ("reconcile", "resolved", None),
    ]  # differences; late no more
    assert w.sent[1].value == 3 and "reconcile_diff" in w.sent[1].summary
    read({"bill_date": "2026-12-01", "state": "CLEAN", "diffs": 0, "last_error": None}, 19)  # run again after a fix
    assert w.states()[-1] == ("reconcile", "resolved", None) and len(w.sent) == 4


def test_what_wechat_did_that_is_not_recorded_here_fires_through_the_leader_and_resolves_once_recorded():
    w = World()
    w.read(snapshot(stage("close_unpaid"), facts=1, leader=False))
    assert w.sent == []
    w.read(snapshot(stage("close_unpaid"), facts=2))
    assert w.states() == [("channel_facts", "firing", None)] and "SELECT * FROM channel_fact" in w.sent[-1].summary
    w.clock.advance(700)
    w.read(snapshot(stage("close_unpaid"), facts=0))
    assert w.states()[-1] == ("channel_facts", "resolved", None)
