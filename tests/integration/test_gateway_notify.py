"""The emulator's refund notifications, received by NotifyServer through the real gateway's verifier.

Delivery is asynchronous; every wait is a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import requests

from gateway.contract import RefundRequest
from gateway.notify import NotifyServer

DEADLINE_SECONDS = 10


class Hook:
    """on_refund that records what it got and lets a test wait for it."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.calls = 0
        self._fail_first = fail_first
        self._cond = threading.Condition()

    def __call__(self, resource: dict[str, Any]) -> None:
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
            if self.calls <= self._fail_first:
                raise RuntimeError("the database is briefly unavailable")
            self.received.append(resource)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


@pytest.fixture
def start_notify_server(gateway) -> Iterator[Callable[..., NotifyServer]]:
    servers: list[NotifyServer] = []

    def start(hook: Hook, **kwargs: Any) -> NotifyServer:
        server = NotifyServer(gateway, hook, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def attempts(emulator, number: str) -> list[int | None]:
    return [a.status for a in emulator.notifications if a.out_refund_no == number]


def apply_and_finish(make_gateway, emulator_clock, notify_url: str, number: str = "R1", order: str = "O1") -> None:
    gateway = make_gateway(notify_url=notify_url)
    result = gateway.apply(RefundRequest(number, order, 1280, 1280))
    assert result.refund.status == "PROCESSING"
    emulator_clock.advance(1)  # past success_delay; the emulator's ticker notices and notifies


def test_a_successful_refund_is_announced_verified_and_decrypted(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook()
    server = start_notify_server(hook)

    apply_and_finish(make_gateway, emulator_clock, server.url)

    assert hook.wait_for(lambda: len(hook.received) == 1)
    resource = hook.received[0]
    assert resource["out_refund_no"] == "R1"
    assert resource["refund_status"] == "SUCCESS"
    assert resource["amount"]["refund"] == 1280
    assert resource["mchid"] == emulator.keys.mchid
    assert resource["success_time"].endswith("+08:00")
    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204], DEADLINE_SECONDS)


def test_a_notification_delivered_twice_reaches_the_hook_once(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook()
    server = start_notify_server(hook)
    emulator.duplicate_notifications = True

    apply_and_finish(make_gateway, emulator_clock, server.url)

    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [204, 200], DEADLINE_SECONDS)
    ids = {a.notification_id for a in emulator.notifications}
    assert len(ids) == 1
    assert hook.calls == 1


def test_closed_and_abnormal_refunds_are_announced_as_such(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook()
    server = start_notify_server(hook)
    emulator.close_refunds_for("R-CLOSED")
    emulator.abnormal_for("R-ABNORMAL")
    gateway = make_gateway(notify_url=server.url)

    gateway.apply(RefundRequest("R-CLOSED", "O1", 100, 100))
    gateway.apply(RefundRequest("R-ABNORMAL", "O2", 100, 100))
    emulator_clock.advance(1)

    assert hook.wait_for(lambda: len(hook.received) == 2)
    statuses = {r["out_refund_no"]: r["refund_status"] for r in hook.received}
    assert statuses == {"R-CLOSED": "CLOSED", "R-ABNORMAL": "ABNORMAL"}
    assert emulator.wait_for(
        lambda: {a.event_type for a in emulator.notifications} == {"REFUND.CLOSED", "REFUND.ABNORMAL"}, DEADLINE_SECONDS
    )

    emulator.resolve_abnormal("R-ABNORMAL")

    assert hook.wait_for(lambda: len(hook.received) == 3)
    assert hook.received[2]["refund_status"] == "SUCCESS"


def test_a_notification_with_a_bad_signature_is_refused_until_a_genuine_one_comes(
    start_notify_server, make_gateway, emulator, emulator_clock
):
    hook = Hook()
    server = start_notify_server(hook)
    emulator.send_bad_signature_notifications = True

    apply_and_finish(make_gateway, emulator_clock, server.url)

    assert emulator.wait_for(lambda: attempts(emulator, "R1")[:1] == [401], DEADLINE_SECONDS)
    assert hook.calls == 0

    emulator.send_bad_signature_notifications = False  # WeChat's next retry is genuine

    assert hook.wait_for(lambda: len(hook.received) == 1)
    assert emulator.wait_for(lambda: attempts(emulator, "R1")[-1:] == [204], DEADLINE_SECONDS)
    assert set(attempts(emulator, "R1")[:-1]) == {401}


def test_a_stale_notification_is_refused(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook()
    server = start_notify_server(hook, clock=lambda: time.time() + 301)

    apply_and_finish(make_gateway, emulator_clock, server.url)

    assert emulator.wait_for(lambda: len(attempts(emulator, "R1")) >= 2, DEADLINE_SECONDS)
    assert set(attempts(emulator, "R1")) == {401}
    assert hook.calls == 0


def test_a_failing_hook_answers_500_and_the_retry_is_taken(start_notify_server, make_gateway, emulator, emulator_clock):
    hook = Hook(fail_first=1)
    server = start_notify_server(hook)

    apply_and_finish(make_gateway, emulator_clock, server.url)

    assert hook.wait_for(lambda: len(hook.received) == 1)
    assert emulator.wait_for(lambda: attempts(emulator, "R1") == [500, 204], DEADLINE_SECONDS)
    assert hook.calls == 2


def test_forged_or_malformed_posts_are_refused_without_calling_the_hook(start_notify_server, key_material):
    hook = Hook()
    server = start_notify_server(hook)
    body = json.dumps({"id": "x", "event_type": "REFUND.SUCCESS", "resource": {}}).encode()
    now = str(int(time.time()))
    forged = {
        "Wechatpay-Timestamp": now,
        "Wechatpay-Nonce": "N",
        "Wechatpay-Signature": "AAAA",
        "Wechatpay-Serial": key_material.platform_public_key_id,
        "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
    }

    answers = [
        requests.post(server.url, data=body, headers=forged, timeout=2).status_code,
        requests.post(server.url, data=body, headers={**forged, "Wechatpay-Serial": "ABC123"}, timeout=2).status_code,
        requests.post(server.url, data=body, headers={}, timeout=2).status_code,
        requests.post(server.url, data=b"not json", headers=forged, timeout=2).status_code,
    ]

    assert answers == [401, 401, 401, 401]
    assert hook.calls == 0
