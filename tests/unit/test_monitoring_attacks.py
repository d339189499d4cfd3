"""Attacks on the alert book: a spell silenced by the cooldown, and a daemon that stops leading."""

from __future__ import annotations

from tests.unit.test_alert_rules import World, snapshot, stage


def test_a_subject_that_fires_again_within_the_cooldown_and_stays_firing_is_announced_once_the_cooldown_has_passed():
    w = World(cooldown=600, rows_failed={"threshold": 1})
    w.read(snapshot(stage("submit_refund", failed=1)))
    w.clock.t += 10
    w.read(snapshot(stage("submit_refund", failed=0)))  # a person requeued it: resolved
    w.clock.t += 10
    w.read(snapshot(stage("submit_refund", failed=3)))  # failing again, within the cooldown: quiet for now
    assert w.states() == [("rows_failed", "firing", "submit_refund"), ("rows_failed", "resolved", "submit_refund")]
    w.clock.t += 600  # still failing long after: the last word people heard must not stay "RESOLVED"
    w.read(snapshot(stage("submit_refund", failed=3)))
    assert w.states()[-1] == ("rows_failed", "firing", "submit_refund") and w.sent[-1].value == 3
    w.clock.t += 10
    w.read(snapshot(stage("submit_refund", failed=3)))
    w.read(snapshot(stage("submit_refund", failed=0)))
    assert w.states()[2:] == [("rows_failed", "firing", "submit_refund"), ("rows_failed", "resolved", "submit_refund")]


def test_a_daemon_that_stops_leading_forgets_the_database_alerts_quietly_instead_of_showing_them_firing_forever():
    w = World(rows_failed={"threshold": 1})
    w.read(snapshot(stage("sync_result", failed=3)))
    assert w.book.firing() == [("rows_failed", "sync_result")]
    # Declared dead in an outage, it registered again behind another daemon, which speaks now.
    w.read(snapshot(stage("sync_result", failed=3), leader=False))
    assert w.book.firing() == []
    assert w.states() == [("rows_failed", "firing", "sync_result")]  # no RESOLVED: the condition still holds
    w.read(snapshot(stage("sync_result", failed=0), leader=False))
    w.read(snapshot(stage("sync_result", failed=0)))  # leading again: nothing to resolve here
    assert w.states() == [("rows_failed", "firing", "sync_result")]
