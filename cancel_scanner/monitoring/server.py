"""/metrics, /healthz, /readyz and the status page on `monitoring.listen`.

/healthz: the process and its scheduler are alive. /readyz: the database answers and the gateway
is configured. /metrics: the registry, never a database query. /: the status page, rendered from
the watcher's last snapshot (never a query per view). Every request is bounded in time: a client
that trickles its request is cut off after REQUEST_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loguru import logger
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text

from cancel_scanner.monitoring.page import PageView, render

REQUEST_TIMEOUT_SECONDS = 5.0
READY_DB_TIMEOUT_SECONDS = 2.0
PAGE_HEADERS = (
    # The page runs no script and loads nothing: say so to the browser as well.
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
)


class MonitoringServer:
    """A thread per connection, each bounded in time."""

    def __init__(
        self,
        metrics: Any,
        host: str,
        port: int,
        *,
        alive: Callable[[], bool],
        db: Engine,
        gateway_ready: Callable[[], bool],
        page: Callable[[], PageView] | None = None,
        token: str | None = None,
    ) -> None:
        server = self
        expected = token.encode("utf-8") if token else None

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS

            def setup(self) -> None:
                # The socket timeout bounds each read, and a byte inside it resets it: one timer
                # bounds the whole connection, so a trickling client cannot keep its thread.
                super().setup()
                self._deadline = threading.Timer(REQUEST_TIMEOUT_SECONDS, self._cut)
                self._deadline.daemon = True
                self._deadline.start()

            def _cut(self) -> None:
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:
                    pass  # the client went away, or the deadline cut it: nothing to answer

            def finish(self) -> None:
                self._deadline.cancel()
                try:
                    super().finish()
                except OSError:
                    pass  # cut by the deadline: nothing left to flush

            def _allowed(self) -> bool:
                """With a token: `Authorization: Bearer TOKEN`, or HTTP basic auth with TOKEN as the
                password (any user name), so that a browser can open the page. Compared in constant time."""
                if expected is None:
                    return True
                given = self.headers.get("Authorization", "")
                scheme, _, value = given.partition(" ")
                offered = b""
                if scheme.lower() == "bearer":
                    offered = value.strip().encode("utf-8")
                elif scheme.lower() == "basic":
                    try:
                        offered = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
                    except (ValueError, binascii.Error):
                        offered = b""
                return hmac.compare_digest(offered, expected)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path != "/healthz" and not self._allowed():  # a liveness probe needs no key
                    self._send(
                        401,
                        b"a token is needed: Authorization: Bearer TOKEN, or basic auth with it as the password\n",
                        headers=(("WWW-Authenticate", 'Basic realm="cancel-scanner", charset="UTF-8"'),),
                    )
                    return
                if path == "/metrics" and metrics is not None:
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = alive()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"scheduler not running\n")
                elif path == "/readyz":
                    problem = server.not_ready()
                    self._send(503 if problem else 200, (problem or "ready").encode() + b"\n")
                elif path in ("/", "/index.html") and page is not None:
                    self._send(200, render(page()).encode("utf-8"), "text/html; charset=utf-8", PAGE_HEADERS)
                else:
                    self._send(404, b"not found\n")

            def _send(
                self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", headers: tuple = ()
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # requests are not worth a log line each
                return

        self.db, self.gateway_ready = db, gateway_ready
        self._probing = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cs-monitoring", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> MonitoringServer:
        self._thread.start()
        logger.bind(stage="monitoring", action="listening", port=self.port).info(
            "metrics, health and status page on port {}", self.port
        )
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def not_ready(self) -> str | None:
        """None when ready; else what is not."""
        if not self.gateway_ready():
            return "gateway not configured"
        # One probe of the database at a time: probes of a hung database must not pile up threads
        # and connections of the stages' pool; one still waiting answers the others.
        if not self._probing.acquire(blocking=False):
            return "database did not answer in time"
        result: list[BaseException | None] = []

        def ping() -> None:
            try:
                with self.db.connect() as conn:
                    conn.execute(text("SELECT 1"))
                result.append(None)
            except Exception as exc:  # noqa: BLE001 - what readyz reports
                result.append(exc)
            finally:
                self._probing.release()

        probe = threading.Thread(target=ping, daemon=True)
        probe.start()
        probe.join(READY_DB_TIMEOUT_SECONDS)
        if not result:
            return "database did not answer in time"
        return f"database unavailable: {type(result[0]).__name__}" if result[0] is not None else None
