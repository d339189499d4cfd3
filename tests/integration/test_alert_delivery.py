"""Alert delivery over real HTTP, to receivers started here on 127.0.0.1.

Given a notifier and a receiver that answers well, badly, slowly or never, when alerts are sent,
then the caller never waits, each alert has one outcome, and no log line shows the robot's key.
The only wall-clock waits are the behaviour under test (a receiver trickling its answer, a POST
running into its deadline); everything else waits on a condition with a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from loguru import logger

from cancel_scanner.alerts.deliver import Alert, Notifier
from testsupport.waiting import wait_until

AT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
OK = b'{"errcode":0,"errmsg":"ok"}'
SECRET = "SEC-signing-secret-7f3a"
QUICK_RETRIES = (0.01, 0.01)
# Each robot's URL carries its key: in the query (WeCom, DingTalk) or in the path (Feishu).
KEYED_PATHS = {
    "wecom": ("/cgi-bin/webhook/send?key=KEY-693a91f6", ("KEY-693a91f6", "/cgi-bin", "webhook/send")),
    "dingtalk": ("/robot/send?access_token=TOKEN-0f1e2d", ("TOKEN-0f1e2d", "/robot", "access_token")),
    "feishu": ("/open-apis/bot/v2/hook/HOOK-4c5d6e", ("HOOK-4c5d6e", "/open-apis", "bot/v2")),
    "json": ("/alerts/PATH-SECRET-91?token=TOKEN-5a5a", ("PATH-SECRET-91", "TOKEN-5a5a", "/alerts")),
}


def alert(summary: str = "退款网关失败率 42% (21/50), merchant 好物 shop", rule: str = "gateway_failure_rate") -> Alert:
    return Alert(rule=rule, state="firing", summary=summary, stage="submit_refund", value=0.42, at=AT)


class Receiver:
    """A webhook on 127.0.0.1: records every POST (path with query, headers, body) and gives one answer."""

    def __init__(self, status: int = 200, body: bytes = OK, headers: dict[str, str] | None = None) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((self.path, dict(self.headers), data))
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawReceiver:
    """Accepts, sends `at_once`, then `trickled` one byte every `every` seconds, then holds the line open.

    With nothing to send it is a receiver that accepts and never answers.
    """

    def __init__(self, at_once: bytes = b"", trickled: bytes = b"", every: float = 0.1) -> None:
        self.at_once, self.trickled, self.every = at_once, trickled, every
        self.accepted = threading.Event()
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.set()
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.at_once)
                for byte in self.trickled:
                    if self.stopped.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the notifier hung up: that is the point
            self.stopped.wait()

    def close(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def serve():
    started = []

    def start(receiver):
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.close()


class Outcomes(list):
    """Every outcome reported, with the monotonic time it was reported at: the notifier's `on_result`."""

    def __call__(self, outcome: str) -> None:
        self.append((outcome, time.monotonic()))


@pytest.fixture
def outcomes():
    return Outcomes()


@pytest.fixture
def notifiers(outcomes):
    made = []

    def make(url: str, fmt: str = "json", *, start: bool = True, **options) -> Notifier:
        options.setdefault("retry_delays_seconds", QUICK_RETRIES)
        notifier = Notifier(url, fmt, on_result=outcomes, **options)
        made.append(notifier)
        return notifier.start() if start else notifier

    yield make
    for notifier in made:
        notifier.stop(timeout=1.0)


@pytest.fixture
def logged():
    lines: list[str] = []
    sink = logger.add(
        lambda message: lines.append(str(message).rstrip("\n")),
        level="DEBUG",
        diagnose=False,
        backtrace=False,
        format="{level}|{message}|{extra}",
    )
    yield lines
    logger.remove(sink)


def names(outcomes) -> list[str]:
    return [name for name, _ in outcomes]


def wait_for_outcomes(outcomes, count: int, timeout: float = 10.0) -> list[str]:
    return wait_until(
        lambda: names(outcomes), timeout, f"{count} outcomes", until=lambda seen: len(seen) >= count, interval=0.01
    )


# -- delivered ------------------------------------------------------------------------------


def test_a_json_receiver_gets_exactly_the_alert_object(serve, notifiers, outcomes):
    receiver = serve(Receiver(body=b""))
    notifier = notifiers(receiver.url(), "json")

    assert notifier.send(alert())
    assert notifier.wait_idle(10)

    [(path, headers, body)] = receiver.posts
    assert json.loads(body) == {
        "rule": "gateway_failure_rate",
        "state": "firing",
        "summary": "退款网关失败率 42% (21/50), merchant 好物 shop",
        "stage": "submit_refund",
        "value": 0.42,
        "at": "2026-12-01T10:00:00+00:00",
    }
    assert headers["Content-Type"] == "application/json"
    assert names(outcomes) == ["sent"]


def test_dingtalk_posts_to_its_signed_url_at_the_notifiers_wall_time(serve, notifiers, outcomes):
    receiver = serve(Receiver())
    notifier = notifiers(
        receiver.url("/robot/send?access_token=TOKEN-1"), "dingtalk", secret=SECRET, wall=lambda: 1_764_583_200.0
    )

    notifier.send(alert())
    assert notifier.wait_idle(10)

    [(path, _, body)] = receiver.posts
    query = parse_qs(urlsplit(path).query)
    digest = hmac.new(SECRET.encode(), f"1764583200000\n{SECRET}".encode(), hashlib.sha256).digest()
    assert query == {
        "access_token": ["TOKEN-1"],
        "timestamp": ["1764583200000"],
        "sign": [base64.b64encode(digest).decode()],
    }
    assert json.loads(body)["msgtype"] == "markdown"
    assert names(outcomes) == ["sent"]


@pytest.mark.parametrize(
    "answer, outcome",
    [
        (b'{"code":0,"msg":"success","data":{}}', "sent"),
        (b'{"StatusCode":0,"StatusMessage":"success"}', "sent"),  # older Feishu answers
        (b'{"code":19021,"msg":"sign match fail or timestamp is not within one hour from current time"}', "failed"),
    ],
)
def test_feishu_counts_its_answers_code(serve, notifiers, outcomes, answer, outcome):
    receiver = serve(Receiver(body=answer))
    notifier = notifiers(receiver.url("/open-apis/bot/v2/hook/HOOK-1"), "feishu", secret=SECRET)

    notifier.send(alert())
    assert notifier.wait_idle(10)

    assert names(outcomes) == [outcome]
    assert "sign" in json.loads(receiver.posts[0][2])


# -- not delivered: retried, counted, logged without the key ------------------------------------


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk", "feishu", "json"])
def test_a_500_is_tried_three_times_then_failed_and_the_log_shows_no_key(serve, notifiers, outcomes, logged, fmt):
    receiver = serve(Receiver(status=500, body=b"internal error"))
    path, secrets = KEYED_PATHS[fmt]
    notifier = notifiers(receiver.url(path), fmt, secret=SECRET)

    notifier.send(alert(summary="merchant text PAYLOAD-MARK 好物"))
    assert notifier.wait_idle(10)

    assert len(receiver.posts) == 3
    assert names(outcomes) == ["failed"]
    [warning] = [line for line in logged if line.startswith("WARNING")]
    assert "HTTP 500" in warning and fmt in warning and "127.0.0.1" in warning
    for line in logged + [repr(notifier)]:
        for secret in (*secrets, SECRET, "PAYLOAD-MARK"):
            assert secret not in line


def test_a_wecom_errcode_with_status_200_is_a_failure(serve, notifiers, outcomes, logged):
    receiver = serve(Receiver(body=b'{"errcode":93000,"errmsg":"invalid webhook url, hint: [1764583200_x]"}'))
    notifier = notifiers(receiver.url(KEYED_PATHS["wecom"][0]), "wecom")

    notifier.send(alert())
    assert notifier.wait_idle(10)

    assert names(outcomes) == ["failed"]
    assert len(receiver.posts) == 3
    assert any("errcode 93000" in line for line in logged if line.startswith("WARNING"))


def test_a_redirect_is_not_followed_so_the_key_stays_with_its_host(serve, notifiers, outcomes, logged):
    elsewhere = serve(Receiver())
    receiver = serve(Receiver(status=302, body=b"", headers={"Location": elsewhere.url("/steal")}))
    notifier = notifiers(receiver.url(KEYED_PATHS["wecom"][0]), "wecom")

    notifier.send(alert())
    assert notifier.wait_idle(10)

    assert names(outcomes) == ["failed"]
    assert elsewhere.posts == []
    assert any("HTTP 302" in line for line in logged if line.startswith("WARNING"))


# -- slow and silent receivers: the caller never waits --------------------------------------------


def test_a_receiver_that_never_answers_costs_the_caller_nothing_and_fails_at_the_timeout(serve, notifiers, outcomes):
    receiver = serve(RawReceiver())
    notifier = notifiers(receiver.url(), "json", timeout_seconds=0.5, retry_delays_seconds=())

    started = time.monotonic()
    queued = notifier.send(alert())
    returned = time.monotonic() - started

    assert queued and returned < 0.05
    wait_for_outcomes(outcomes, 1)
    [(outcome, at)] = outcomes
    assert outcome == "failed"
    assert 0.4 <= at - started < 2.0


def test_stop_returns_within_its_bound_while_a_post_hangs(serve, notifiers, outcomes):
    receiver = serve(RawReceiver())
    notifier = notifiers(receiver.url(), "json", timeout_seconds=30)
    notifier.send(alert(rule="in_flight"))
    notifier.send(alert(rule="queued"))
    assert receiver.accepted.wait(10)

    started = time.monotonic()
    notifier.stop(timeout=1.0)
    took = time.monotonic() - started

    assert took < 1.1
    assert sorted(wait_for_outcomes(outcomes, 2, timeout=5)) == ["dropped", "failed"]
    assert not notifier.send(alert(rule="late"))  # a stopped notifier takes nothing more
    assert names(outcomes)[-1] == "dropped"


@pytest.mark.parametrize(
    "at_once, trickled",
    [
        (b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n", b"{" + b" " * 198 + b"}"),
    ],
    ids=["trickled-status-line", "trickled-body"],
)
def test_an_answer_trickled_byte_by_byte_is_cut_off_at_the_deadline(
    serve, notifiers, outcomes, logged, at_once, trickled
):
    receiver = serve(RawReceiver(at_once=at_once, trickled=trickled, every=0.05))  # each read well within the timeout
    notifier = notifiers(receiver.url(), "json", timeout_seconds=1.0, retry_delays_seconds=())

    started = time.monotonic()
    notifier.send(alert())
    wait_for_outcomes(outcomes, 1)

    [(outcome, at)] = outcomes
    assert outcome == "failed"
    assert 0.9 <= at - started < 2.5  # the whole answer would take over 4 s
    assert any("DeadlinePassed" in line for line in logged if line.startswith("WARNING"))


# -- a full queue drops ------------------------------------------------------------------------


def test_a_full_queue_drops_and_counts_the_alert(serve, notifiers, outcomes, logged):
    receiver = serve(Receiver(body=b""))
    notifier = notifiers(receiver.url(), "json", queue_size=2, start=False)  # nothing drains it yet

    started = time.monotonic()
    accepted = [notifier.send(alert(rule=f"rule_{n}")) for n in range(3)]

    assert time.monotonic() - started < 0.05
    assert accepted == [True, True, False]
    assert names(outcomes) == ["dropped"]
    assert [line for line in logged if line.startswith("WARNING")] == [
        "WARNING|alert rule_2 firing dropped: the queue is full|{'stage': 'alerts', 'action': 'dropped', 'rule': 'rule_2'}"
    ]

    notifier.start()
    assert notifier.wait_idle(10)
    assert [json.loads(body)["rule"] for _, _, body in receiver.posts] == ["rule_0", "rule_1"]
    assert names(outcomes) == ["dropped", "sent", "sent"]
