"""The merchant-side endpoint for WeChat Pay refund notifications (REFUND.SUCCESS / CLOSED / ABNORMAL).

Notifications are a hint, not a source of truth: delivery is not guaranteed,
so the poll stage stays the only place that changes money state. `on_refund`
must therefore be quick and side-effect light (e.g. mark the row for an
early poll): WeChat wants an answer within 5 s and retries otherwise, and a
slow hook would also hold one of this server's threads.

Answers: 204 accepted; 200 duplicate (already accepted, same `id`); 401 bad
signature or a timestamp more than 300 s from our clock, so WeChat retries and
a replayed capture cannot be used later; 500 when the hook failed, so WeChat
retries. Failure bodies follow WeChat's `{"code": "FAIL", "message": ...}`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Protocol

from loguru import logger

MAX_SKEW_SECONDS = 300
DEDUPE_IDS = 10_000  # WeChat's retries for one id span ~24 h; 10k ids outlast that at our refund rates
MAX_BODY_BYTES = 64 * 1024
NOTIFY_PATH = "/wechat/refund-notify"

_log = logger.bind(component="notify")


class NotificationVerifier(Protocol):
    """WeChatPayGateway.parse_notification: the envelope with `resource` decrypted, or None if not authentic."""

    def parse_notification(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any] | None: ...


class _SeenIds:
    """A bounded LRU of notification ids; the oldest are forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, notification_id: str) -> bool:
        """Record the id; False if it was already there."""
        with self._lock:
            if notification_id in self._ids:
                self._ids.move_to_end(notification_id)
                return False
            self._ids[notification_id] = None
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return True

    def discard(self, notification_id: str) -> None:
        with self._lock:
            self._ids.pop(notification_id, None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 refuses a burst of new connections (16 worker
    # threads opening theirs at once) with connect timeouts the real gateway never shows.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: NotifyServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if self.path.split("?", 1)[0] != self.server.owner.path:
            self._answer(404, "FAIL", "not found")
            return
        if length <= 0 or length > MAX_BODY_BYTES:
            self._answer(400, "FAIL", "missing or oversized body")
            return
        try:
            status, message = self.server.owner.handle(self.headers, self.rfile.read(length))
        except Exception:
            # Answer anyway: without an answer WeChat waits out its timeout before retrying.
            _log.opt(exception=True).warning("refund notification could not be handled; WeChat will retry")
            status, message = 500, "internal error"
        self._answer(status, "SUCCESS" if status < 300 else "FAIL", message)

    def _answer(self, status: int, code: str, message: str) -> None:
        body = b"" if status == 204 else json.dumps({"code": code, "message": message}).encode("utf-8")
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # NotifyServer.handle logs one event per notification


class NotifyServer:
    """HTTP endpoint that verifies, decrypts and dedupes refund notifications, then calls on_refund(resource)."""

    def __init__(
        self,
        verifier: NotificationVerifier,
        on_refund: Callable[[dict[str, Any]], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = NOTIFY_PATH,
        clock: Callable[[], float] = time.time,
        max_skew_seconds: float = MAX_SKEW_SECONDS,
        dedupe_ids: int = DEDUPE_IDS,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self._verifier = verifier
        self._on_refund = on_refund
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._seen = _SeenIds(dedupe_ids)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The URL to hand to WeChat as notify_url (behind an https proxy in production)."""
        if self._server is None:
            raise RuntimeError("the notify server is not started")
        return f"http://{self.host}:{self._server.server_address[1]}{self.path}"

    def start(self) -> NotifyServer:
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="notify-http", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> NotifyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, str]:
        """Decide the answer to one notification: (HTTP status, message). Usable without HTTP."""
        lowered = {str(name).lower(): value for name, value in headers.items()}
        try:
            timestamp = int(lowered.get("wechatpay-timestamp") or "")
        except ValueError:
            return self._reject("missing or malformed Wechatpay-Timestamp")
        if abs(self._clock() - timestamp) > self._max_skew:
            # The SDK does not check this; without it a captured notification could be replayed forever.
            return self._reject("stale Wechatpay-Timestamp")
        envelope = self._verifier.parse_notification(headers, body)
        if envelope is None:
            return self._reject("signature verification failed")
        notification_id = str(envelope.get("id") or "")
        event_type = str(envelope.get("event_type") or "")
        resource: dict[str, Any] = envelope["resource"]
        log = _log.bind(notification_id=notification_id, event_type=event_type, out_refund_no=resource.get("out_refund_no"))
        if not event_type.startswith("REFUND."):
            log.info("ignored a notification that is not about a refund")
            return 204, "ignored"
        if not self._seen.add(notification_id):
            log.debug("duplicate refund notification")
            return 200, "duplicate"
        try:
            self._on_refund(resource)
        except Exception:
            # Forget the id so WeChat's retry gets another chance; polling covers us if it never comes.
            self._seen.discard(notification_id)
            log.opt(exception=True).warning("refund notification hook failed; WeChat will retry")
            return 500, "hook failed"
        log.debug("refund notification accepted")
        return 204, "ok"

    @staticmethod
    def _reject(reason: str) -> tuple[int, str]:
        _log.bind(reason=reason).warning("rejected a refund notification")
        return 401, reason

    def __repr__(self) -> str:
        return f"NotifyServer(host={self.host!r}, port={self.port!r}, path={self.path!r})"
