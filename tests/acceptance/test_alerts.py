"""Alerts people receive (issue 14): a daemon whose every WeChat Pay call fails sends one firing
message to the group robot, and one resolved message once the calls succeed again; the robot's
key in the webhook URL appears in no log line.

Live mode against the emulator, on MariaDB, with the `json` format (the contract's shape).
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.acceptance import harness
from testsupport import shop
from testsupport.emulator_faults import FaultPlan
from testsupport.waiting import wait_until
from testsupport.webhook import WebhookReceiver

pytestmark = pytest.mark.mysql
N = 6
KEY = "robotkey-7f3a9c"  # the secret part of the webhook URL


def test_every_call_failing_then_recovering_sends_one_firing_and_one_resolved_message(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    orders = harness.paid_orders(mysql_db, emu, N)
    emu.emulator.faults.plan = FaultPlan(p_5xx=1.0)  # WeChat Pay answers every call with a 5xx

    with WebhookReceiver() as robot:
        config = harness.daemon_config(
            mysql_url,
            emu,
            monitoring={"refresh_seconds": 1},
            alerts={
                "webhook_url": f"{robot.url}/cgi-bin/webhook/send?key={KEY}",
                "format": "json",
                "cooldown_seconds": 600,
                "rules": {"gateway_failure_rate": {"threshold": 0.5, "window_seconds": 10, "min_calls": 3}},
            },
        )
        daemon = daemons(tmp_path, config, emu.env())
        daemon.start()
        daemon.wait_started()
        shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])

        (firing,) = wait_until(robot.bodies, 60, "the firing message", until=bool, daemons=[daemon])
        assert set(firing) == {"rule", "state", "summary", "stage", "value", "at"}
        assert (firing["rule"], firing["state"], firing["stage"]) == ("gateway_failure_rate", "firing", None)
        assert firing["value"] >= 0.5 and "WeChat Pay calls" in firing["summary"]
        assert datetime.fromisoformat(firing["at"]).utcoffset().total_seconds() == 0
        assert harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1") == 0

        emu.emulator.faults.plan = None  # WeChat Pay is back
        harness.wait_settled(mysql_db, 60, [daemon])
        messages = wait_until(robot.bodies, 30, "the resolved message", until=lambda b: len(b) >= 2, daemons=[daemon])
        assert [(m["rule"], m["state"]) for m in messages] == [
            ("gateway_failure_rate", "firing"),
            ("gateway_failure_rate", "resolved"),
        ]
        assert {no: n for no, n in emu.emulator.refunds_created.items() if n != 1} == {}
        assert len(emu.emulator.refunds_created) == N
        assert all(path.startswith("/cgi-bin/webhook/send?key=") for path, _body in robot.received)
        daemon.sigterm()
        assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    assert KEY not in daemon.log_text()
