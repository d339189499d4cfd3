"""Attacks on the alert book: a spell silenced by the cooldown, and a daemon that stops leading."""

from __future__ import annotations

from tests.unit.test_alert_rules import World, snapshot, stage


def test_a_subject_that_fires_again_within_the_cooldown_and_stays_firing_is_announced_once_the_cooldown_has_passed():
    w = World(cooldown=600, rows_failed={"threshold": 1})
    w.read(snapshot(stage("submit_refund", failed=1)))
    w.clock.advance(10)
    w.read(snapshot(stage("submit_refund", failed=0)))  # a person requeued it: resolved
    w.clock.advance(10)
    w.read(snapshot(stage("submit_refund", failed=3)))  # failing again, within the cooldown: quiet for now
    assert w.states() == [("rows_failed", "firing", "submit_refund"), ("rows_failed", "resolved", "submit_refund")]
    w.clock.advance(600)  # still failing long after: the last word people heard must not stay "RESOLVED"
    w.read(snapshot(stage("submit_refund", failed=3)))
    assert w.states()[-1] == ("rows_failed", "firing", "submit_refund") and w.sent[-1].value == 3
    w.clock.advance(10)
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


def test_a_client_trickling_its_request_is_cut_off_after_the_request_timeout(monkeypatch):
    """Each byte inside the socket timeout would reset it: the bound must be on the whole request."""
    import socket
    import threading
    import time

    from cancel_scanner.monitoring import server as monitoring_server

    monkeypatch.setattr(monitoring_server, "REQUEST_TIMEOUT_SECONDS", 0.5)
    srv = monitoring_server.MonitoringServer(
        None, "127.0.0.1", 0, alive=lambda: True, db=None, gateway_ready=lambda: True
    ).start()
    pace = threading.Event()
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started, cut = time.monotonic(), False
        while time.monotonic() - started < 3:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # a header every 0.2 s, forever
            except OSError:
                cut = True
                break
            pace.wait(0.2)  # the attacker's pace, not a wait for the server
        sock.close()
        assert cut, "the server kept a trickling request open for 3 s"
        assert time.monotonic() - started < 1.5
    finally:
        srv.stop()
