"""The merchant-side endpoint for WeChat Pay refund notifications (REFUND.SUCCESS / CLOSED / ABNORMAL).

Notifications are a hint, not a source of truth: delivery is not guaranteed,
so the poll stage stays the only place that changes money state. `on_refund`
must therefore be quick and side-effect light (e.g. mark the row for an
early poll): WeChat wants an answer within 5 s and retries otherwise, and a
slow hook holds one of the server's few worker threads, delaying every
notification queued behind it.

Answers: 204 accepted; 200 duplicate (already accepted, same `id`); 401 bad
signature or a timestamp more than 300 s from our clock, so WeChat retries and
a replayed capture cannot be used later; 500 when the hook failed, so WeChat
retries. Failure bodies follow WeChat's `{"code": "FAIL", "message": ...}`.
Requests that never reach the verifier: 404 another path; 405 another method;
400 a malformed request, or a missing, zero or malformed Content-Length;
411 a Transfer-Encoding (chunked) body; 413 a Content-Length over 64 KiB,
answered from the headers without reading the body; 431 headers over 16 KiB.
These close the connection after the answer.

The transport is one event-loop thread (selectors/epoll) plus a fixed pool of
worker threads, so an idle connection costs a socket and no thread. Each
connection must deliver a complete request within `idle_timeout` seconds of
its accept (or of its previous answer): trickling bytes does not extend that.
Past `max_connections` the longest-waiting connection is closed to make room,
so a burst of idle connections cannot lock out a genuine notification, which
sends its request at once and is therefore never the longest-waiting one.
Nothing here logs headers, bodies or key material.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cancel_scanner.gateway.notify_transport import (
    IDLE_TIMEOUT_SECONDS,
    MAX_CONNECTIONS,
    WORKERS,
    _describe,
    _Limits,
    _log,
    _Transport,
)

MAX_SKEW_SECONDS = 300
DEDUPE_IDS = 10_000  # WeChat's retries for one id span ~24 h; 10k ids outlast that at our refund rates
MAX_BODY_BYTES = 64 * 1024
NOTIFY_PATH = "/wechat/refund-notify"


class HeaderPairs(Protocol):
    """A notification's headers as (name, value) pairs, names in any case: a Mapping[str, str], or the
    http.client.HTTPMessage the server parsed (whose items() keeps every header as it came)."""

    def items(self) -> Iterable[tuple[str, str]]: ...


class NotificationVerifier(Protocol):
    """WeChatPayGateway.parse_notification: the envelope with `resource` decrypted, or None if not authentic."""

    def parse_notification(self, headers: HeaderPairs, body: bytes) -> dict[str, Any] | None: ...


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


# -- HTTP framing -------------------------------------------------------------------


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
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        workers: int = WORKERS,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if idle_timeout <= 0 or max_connections < 1 or workers < 1 or max_body_bytes < 1:
            raise ValueError("idle_timeout, max_connections, workers and max_body_bytes must be positive")
        self.host, self.port, self.path = host, port, path
        self._verifier = verifier
        self._on_refund = on_refund
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._seen = _SeenIds(dedupe_ids)
        self._limits = _Limits(
            idle_timeout=idle_timeout, max_connections=max_connections, workers=workers, max_body=max_body_bytes
        )
        self._transport: _Transport | None = None

    @property
    def url(self) -> str:
        """The URL to hand to WeChat as notify_url (behind an https proxy in production)."""
        if self._transport is None:
            raise RuntimeError("the notify server is not started")
        return f"http://{self.host}:{self._transport.port}{self.path}"

    @property
    def open_connections(self) -> int:
        """Client connections held right now (a diagnostic; 0 when stopped)."""
        return 0 if self._transport is None else self._transport.open_connections

    def start(self) -> NotifyServer:
        if self._transport is None:
            self._transport = _Transport(self, **self._limits)
            self._transport.start()
        return self

    def stop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.stop()

    def __enter__(self) -> NotifyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, headers: HeaderPairs, body: bytes) -> tuple[int, str]:
        try:
            return self.handle(headers, body)
        except Exception as exc:  # noqa: BLE001
            # Answer anyway: without an answer WeChat waits out its timeout before retrying.
            _log.bind(error=_describe(exc)).warning("refund notification could not be handled; WeChat will retry")
            return 500, "internal error"

    def handle(self, headers: HeaderPairs, body: bytes) -> tuple[int, str]:
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
        log = _log.bind(
            notification_id=notification_id, event_type=event_type, out_refund_no=resource.get("out_refund_no")
        )
        if not event_type.startswith("REFUND."):
            log.info("ignored a notification that is not about a refund")
            return 204, "ignored"
        if not self._seen.add(notification_id):
            log.debug("duplicate refund notification")
            return 200, "duplicate"
        try:
            self._on_refund(resource)
        except Exception as exc:  # noqa: BLE001
            # Forget the id so WeChat's retry gets another chance; polling covers us if it never comes.
            self._seen.discard(notification_id)
            log.bind(error=_describe(exc, with_message=True)).warning(
                "refund notification hook failed; WeChat will retry"
            )
            return 500, "hook failed"
        log.debug("refund notification accepted")
        return 204, "ok"

    @staticmethod
    def _reject(reason: str) -> tuple[int, str]:
        _log.bind(reason=reason).warning("rejected a refund notification")
        return 401, reason

    def __repr__(self) -> str:
        return f"NotifyServer(host={self.host!r}, port={self.port!r}, path={self.path!r})"
