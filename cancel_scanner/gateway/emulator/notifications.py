"""The emulator's refund notifications: encrypted, signed, POSTed to notify_url and retried like WeChat's.

A mixin of gateway.emulator.Emulator: the ledger queues a notification when a
refund reaches SUCCESS, CLOSED or ABNORMAL; one background thread delivers
them, retrying on a compressed schedule, and records every attempt in
`notifications`.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
import uuid
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from loguru import logger

from cancel_scanner.gateway.emulator.ledger import TICK_SECONDS
from cancel_scanner.gateway.emulator.records import (
    STATUS_ABNORMAL,
    STATUS_CLOSED,
    STATUS_SUCCESS,
    USER_RECEIVED_ACCOUNT,
    Refund,
    rfc3339,
)
from cancel_scanner.gateway.emulator.signing import Signer, nonce
from cancel_scanner.gateway.keys import KeyMaterial

# WeChat retries over 24 h (15 s ... 6 h); compressed so a test sees retries.
NOTIFY_RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
NOTIFY_TIMEOUT_SECONDS = (1.0, 5.0)

_EVENTS = {
    STATUS_SUCCESS: ("REFUND.SUCCESS", "退款成功"),
    STATUS_CLOSED: ("REFUND.CLOSED", "退款关闭"),
    STATUS_ABNORMAL: ("REFUND.ABNORMAL", "退款异常"),
}

_log = logger.bind(component="emulator")


@dataclass(frozen=True)
class NotificationAttempt:
    notification_id: str
    event_type: str
    out_refund_no: str
    url: str
    status: int | None  # None: no HTTP answer (refused, timed out)


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    notification_id: str = field(compare=False)
    event_type: str = field(compare=False)
    out_refund_no: str = field(compare=False)
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    attempt: int = field(compare=False, default=0)
    duplicate: bool = field(compare=False, default=False)


class NotificationSender:
    # Provided by the Emulator:
    keys: KeyMaterial
    _changed: threading.Condition
    _stopping: threading.Event
    _clock: Callable[[], float]
    _signer: Signer

    def _init_notifications(self, notify_url: str | None, notify_retry_delays: tuple[float, ...]) -> None:
        self.notify_url = notify_url
        self.notify_retry_delays = tuple(notify_retry_delays)
        self.send_bad_signature_notifications = False
        # WeChat sometimes delivers a notification twice; with this on, every
        # delivered notification is sent once more with the same id.
        self.duplicate_notifications = False
        self.notifications: list[NotificationAttempt] = []
        self._aes = AESGCM(self.keys.apiv3_key.encode("utf-8"))
        self._deliveries: list[_Delivery] = []
        self._seq = itertools.count()

    def _queue_notification(self, refund: Refund) -> None:
        """Queue the notification of the refund's new status, if it has one and a notify_url. Caller holds the lock."""
        url = refund.notify_url or self.notify_url
        if not url or refund.status not in _EVENTS:
            return
        event_type, summary = _EVENTS[refund.status]
        resource: dict[str, Any] = {
            "mchid": self.keys.mchid,
            "out_trade_no": refund.out_trade_no,
            "transaction_id": refund.transaction_id,
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "refund_status": refund.status,
            "user_received_account": USER_RECEIVED_ACCOUNT,
            "amount": {
                "total": refund.total,
                "refund": refund.refund,
                "payer_total": refund.total,
                "payer_refund": refund.refund,
            },
        }
        if refund.success_at is not None and refund.status == STATUS_SUCCESS:
            resource["success_time"] = rfc3339(refund.success_at)
        aead_nonce = nonce(12)  # the SDK feeds the nonce's UTF-8 bytes to AES-GCM: 12 characters = 96 bits
        ciphertext = self._aes.encrypt(
            aead_nonce.encode("ascii"), json.dumps(resource, ensure_ascii=False).encode("utf-8"), b"refund"
        )
        notification_id = str(uuid.uuid4())
        envelope = {
            "id": notification_id,
            "create_time": rfc3339(self._clock()),
            "event_type": event_type,
            "resource_type": "encrypt-resource",
            "summary": summary,
            "resource": {
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": b64encode(ciphertext).decode("ascii"),
                "associated_data": "refund",
                "original_type": "refund",
                "nonce": aead_nonce,
            },
        }
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        heapq.heappush(
            self._deliveries,
            _Delivery(time.monotonic(), next(self._seq), notification_id, event_type, refund.out_refund_no, url, body),
        )
        self._changed.notify_all()

    def _send_loop(self) -> None:
        with requests.Session() as session:
            while True:
                with self._changed:
                    while not self._stopping.is_set():
                        if self._deliveries and self._deliveries[0].due <= time.monotonic():
                            break
                        wait = self._deliveries[0].due - time.monotonic() if self._deliveries else TICK_SECONDS * 4
                        self._changed.wait(max(wait, 0.001))
                    if self._stopping.is_set():
                        return
                    delivery = heapq.heappop(self._deliveries)
                self._deliver(session, delivery)

    def _deliver(self, session: requests.Session, delivery: _Delivery) -> None:
        request_id = uuid.uuid4().hex.upper()
        headers = self._signer.signed_headers([delivery.body], request_id, self.send_bad_signature_notifications)
        status: int | None
        try:
            status = session.post(
                delivery.url, data=delivery.body, headers=headers, timeout=NOTIFY_TIMEOUT_SECONDS
            ).status_code
        except requests.RequestException:
            status = None
        with self._changed:
            self.notifications.append(
                NotificationAttempt(
                    delivery.notification_id, delivery.event_type, delivery.out_refund_no, delivery.url, status
                )
            )
            delivered = status is not None and 200 <= status < 300
            if not delivered and delivery.attempt < len(self.notify_retry_delays):
                delivery.due = time.monotonic() + self.notify_retry_delays[delivery.attempt]
                delivery.attempt += 1
                heapq.heappush(self._deliveries, delivery)
            elif delivered and self.duplicate_notifications and not delivery.duplicate:
                delivery.duplicate = True
                delivery.due = time.monotonic()
                heapq.heappush(self._deliveries, delivery)
            self._changed.notify_all()
        _log.bind(
            notification_id=delivery.notification_id,
            event_type=delivery.event_type,
            out_refund_no=delivery.out_refund_no,
            status=status,
            attempt=delivery.attempt,
        ).debug("emulator sent a notification")
