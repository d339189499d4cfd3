"""A WeChat refund notification makes the refund due for polling at once; it never changes money state itself."""

from __future__ import annotations

import threading

from cancel_scanner.gateway.notify import NotifyServer
from cancel_scanner.scanners.intake import out_refund_no_for
from cancel_scanner.scanners.poll_refund import PollRefund
from tests.flow import add_goods, add_order, refunds, request_cancel


def test_a_notification_brings_the_poll_forward_and_the_poll_settles_it(world):
    add_goods(world.db, 1)
    add_order(world.db, 401)
    request_cancel(world.db, 401)
    arrived = threading.Event()
    checked = threading.Event()  # the notification may come at once: it waits until the test has looked

    def on_refund(resource):
        checked.wait(10)
        with world.db.begin() as conn:
            PollRefund((1,)).poll_soon(conn, resource["out_refund_no"], world.clock.now)
        arrived.set()

    with NotifyServer(world.sandbox.gateway, on_refund).start() as server:
        world.emulator.notify_url = server.url
        runner = world.runner()
        runner.run_stage("intake", world.clock.now)
        runner.run_stage("submit_refund", world.clock.now)
        scheduled = refunds(world.db)[401]["next_attempt_at"]
        assert scheduled > world.clock.now  # the first poll would be a second later
        assert runner.run_stage("poll_refund", world.clock.now).claimed == 0
        checked.set()

        assert arrived.wait(10), "no notification within 10 s"
        assert refunds(world.db)[401]["next_attempt_at"] == world.clock.now
        assert refunds(world.db)[401]["progress_scanned"] == 0  # the notification alone decides nothing
        report = runner.run_stage("poll_refund", world.clock.now)
        runner.close()

    assert report.done == 1
    refund = refunds(world.db)[401]
    assert (refund["progress_scanned"], refund["progress_success"], refund["wx_status"]) == (1, 1, "SUCCESS")
    assert world.emulator.refunds_created[out_refund_no_for(401)] == 1


def test_a_notification_for_an_unknown_or_finished_refund_moves_nothing(world):
    with world.db.begin() as conn:
        assert PollRefund((1,)).poll_soon(conn, "CSR999-1", world.clock.now) == 0


def test_the_daemon_serves_notifications_on_notify_listen_and_wakes_the_poll(world, db_url):
    from contextlib import ExitStack

    from cancel_scanner.app import App, serve_notifications
    from tests.flow import test_config

    config = test_config(db_url, wechat={"mode": "sandbox", "timeout_seconds": [2, 2], "notify_listen": "127.0.0.1:0"})
    add_goods(world.db, 1)
    add_order(world.db, 402)
    request_cancel(world.db, 402)
    runner = world.runner()
    woken = []
    woke = threading.Event()

    class Daemon:
        def wake(self, name, after=0.0):
            woken.append(name)
            woke.set()

    app = App(config=config, db=world.db, gateway=world.sandbox.gateway, runner=runner)
    with ExitStack() as stack:
        server = serve_notifications(app, Daemon(), stack)
        world.emulator.notify_url = server.url
        runner.run_stage("intake", world.clock.now)
        runner.run_stage("submit_refund", world.clock.now)
        assert woke.wait(10), "no notification within 10 s"
    runner.close()
    assert woken == ["poll_refund"]
    assert refunds(world.db)[402]["next_attempt_at"] == world.clock.now
