"""The status page and /metrics behind a token (issue 24, item 3), over real HTTP on loopback.

Given a monitoring server with a token, when a client asks without one, with a wrong one, or with the
right one as a Bearer token or as HTTP basic auth's password, then only the right one is served;
/healthz stays open for probes; a 401 names the schemes and never echoes what was offered.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest

from cancel_scanner.monitoring.page import PageView
from cancel_scanner.monitoring.server import MonitoringServer

TOKEN = "s3cret-token-of-the-page-0001"


class Metrics:
    def exposition(self) -> bytes:
        return b"cancel_scanner_pending_rows 0\n"


@pytest.fixture(scope="module")
def server():
    """One server for the module: every test only reads from it, and a stop costs half a second
    (serve_forever's poll interval), 28 times over when each test had its own."""
    page = lambda: PageView(snapshot=None, refresh_seconds=5, host="shop-1:1", now=0.0)  # noqa: E731
    srv = MonitoringServer(
        Metrics(), "127.0.0.1", 0, alive=lambda: True, db=None, gateway_ready=lambda: True, page=page, token=TOKEN
    ).start()
    yield f"http://127.0.0.1:{srv.port}"
    srv.stop()


def get(url: str, authorization: str | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode(), dict(refused.headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("path", ["/", "/metrics", "/readyz"])
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-of-the-page-01",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        basic("ops", "wrong"),
        basic(TOKEN, ""),
        "Basic !!!not-base64",
        f"Token {TOKEN}",
    ],
)
def test_without_the_token_the_page_and_metrics_answer_401(server, path, authorization):
    status, body, headers = get(server + path, authorization)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic realm=")
    assert TOKEN not in body and "wrong" not in body


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", basic("ops", TOKEN), basic("", TOKEN)])
def test_with_the_token_as_bearer_or_basic_auth_password_they_are_served(server, authorization):
    status, body, _ = get(server + "/", authorization)
    assert status == 200 and "<!doctype html>" in body
    status, body, _ = get(server + "/metrics", authorization)
    assert status == 200 and "cancel_scanner_pending_rows" in body


def test_healthz_stays_open_for_probes(server):
    status, body, _ = get(server + "/healthz")
    assert (status, body) == (200, "ok\n")
