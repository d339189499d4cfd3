"""A WeChat Pay API v3 refund emulator: a real HTTP server on a loopback port.

WeChat Pay v3 has no sandbox, so tests and the daemon's sandbox mode talk to
this instead. It behaves like the facts sheet's gateway on every point the
client can observe: signed requests and answers, idempotent refund numbers,
the error codes, the QPS limits, status moving with time, notifications. It
signs and verifies with `cryptography` directly rather than through the SDK,
so a signing bug in the client cannot be mirrored here and go unnoticed.

Choices a test writer should know:

* Wrong mchid in the Authorization header answers 404 MCH_NOT_EXISTS (the
  client's ConfigError path); wrong serial, signature or a timestamp more
  than `max_clock_skew` seconds from `clock()` answers 401 SIGN_ERROR.
* Faults are test code and do not ship: the emulator calls its `faults` hooks
  (gateway.emulator.hooks; NoFaults by default) and tests pass
  `faults=testsupport.emulator_faults.EmulatorFaults(plan)`, which implements
  errors, slow answers, dropped connections, bad signatures, redirects, answers
  trickled a byte at a time, huge answers and spoiled bill downloads, aimed at
  one number or drawn from a random `FaultPlan` (described in that module).
  `fail_next(...)` and `spoil_next_download(...)` here hand their arguments to
  those hooks, and refuse with a RuntimeError on an emulator built without them.
* `force_status(out_refund_no, status)` rewrites a recorded refund's status
  (e.g. CLOSED after SUCCESS) for good, so later answers contradict earlier ones.
* `max_in_flight[out_refund_no]` is the most requests (applies and queries
  alike, from arrival until the answer has left) ever in progress at once
  for that number: the proof that two callers never raced on one refund.
  `in_flight(out_refund_no)` is the count right now (for `wait_for`).
* What a test reads, without reaching inside: `recorded(out_refund_no)` (refund_id,
  status and fen of one refund, its status moved on by `clock` first), the
  counters `refunds_created`, `fen_refunded`, `max_in_flight`, `requests`
  ((method, status) -> count) and `faults_injected` ("500/after" -> count), and
  `snapshot()`, a copy of all five taken at one instant. `logged_requests()`
  copies the `request_log` (its size: `request_log_size`), `forget_requests()`
  empties it and `requests` between measurements.
* apply-abnormal-refund (POST .../refunds/{refund_id}/apply-abnormal-refund) moves an ABNORMAL
  refund to PROCESSING (channel OTHER_BANKCARD) and on to SUCCESS after `success_delay`; any other
  status answers 400 INVALID_REQUEST. USER_BANK_CARD's encrypted bank_account and real_name must
  decrypt with the platform private key; the emulator keeps none of them and logs no body: it counts
  `abnormal_applies[(out_refund_no, type)]`, and hands the decrypted text to `on_bank_details` if a
  test set it (to check the round trip without anything storing the details).
* The daily bill (GET /v3/bill/tradebill and its download) is gateway.emulator.bills': its
  controls (`statement_creating`, `bill_ready_after`, `bill_columns`, `spoil_next_download`,
  `forget_bills`, `bill_bytes`) and its rules (Beijing days, STATEMENT_CREATING, NO_STATEMENT_EXIST)
  are in that module's docstring.
* `latency=(low, high)`: every refund call waits a uniform draw (seeded, so each
  run is alike) before it is handled, as the network and WeChat's own work make
  calls take a while and overlap; it counts as in flight meanwhile.
* Three clocks. `clock` (epoch seconds) drives refund status and the times
  in refund objects; tests inject one and move it instead of sleeping.
  `wire_clock` (default: `clock`) is the one the timestamps on the wire are
  checked against and stamped with: request skew, answer and notification
  signatures. The SDK stamps requests with the real time, so a test that moves
  `clock` by more than `max_clock_skew` must pass `wire_clock=time.time`
  (tests/gateway_fixtures.py does). `monotonic` paces the QPS windows.
* Requests rejected for QPS do not count towards the window.
* `notify_url` may be plain http on a loopback host (WeChat requires https).
* A request that names only a transaction_id of an unknown payment, with
  strict_payments off, registers a payment whose out_trade_no is that id.
* Not emulated: the 6 QPS budget for failed applies, the one-year refund
  window. The one-minute gap between two new refunds of one order (429
  FREQUENCY_LIMITED below it) is kept when `min_refund_interval` is set: the
  daemon's sandbox mode and `cancel-scanner emulator` set it (60 s, or
  wechat.sandbox.refund_spacing_seconds); tests that move the daemon's clock
  faster than the emulator's leave it off.

The package, one concept a module (all of them log as `gateway.emulator.*`):

* here: `Emulator`, its lifecycle and the controls that span the others;
* `exchange`: one HTTP exchange (route, latency, authenticate, QPS, fault hooks, answer, count);
* `server`: the HTTP server and request handler;
* `signing`: request authentication, answer and notification signatures;
* `records` and `ledger`: refunds and payments, their JSON, the status machine;
* `bills`: the daily bill, made from the ledger's payments and refunds, and its download;
* `notifications`: encrypted notifications, delivered and retried;
* `replies`: what an answer is and how its body is written (at once, paced, streamed);
* `hooks`: the fault hooks' protocol (FaultHooks) and its default (NoFaults);
* `command`: the `serve` entry point (`cancel-scanner emulator`), which builds an Emulator from here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from cancel_scanner.gateway.emulator.bills import LEGACY_ALL_COLUMNS, BillDesk
from cancel_scanner.gateway.emulator.exchange import (
    APPLY_QPS,
    QPS_WINDOW_SECONDS,
    QUERY_QPS,
    REFUNDS_PATH,
    REQUEST_LOG_SIZE,
    RequestHandling,
)
from cancel_scanner.gateway.emulator.hooks import FaultHooks, NoFaults
from cancel_scanner.gateway.emulator.ledger import (
    MAX_REFUNDS_PER_ORDER,
    SUCCESS_DELAY_SECONDS,
    TICK_SECONDS,
    RefundLedger,
)
from cancel_scanner.gateway.emulator.notifications import (
    NOTIFY_RETRY_DELAYS_SECONDS,
    NOTIFY_TIMEOUT_SECONDS,
    NotificationAttempt,
    NotificationSender,
)
from cancel_scanner.gateway.emulator.payments import PaymentDesk
from cancel_scanner.gateway.emulator.records import (
    BEIJING,
    STATUS_ABNORMAL,
    STATUS_CLOSED,
    STATUS_PROCESSING,
    STATUS_SUCCESS,
    USER_RECEIVED_ACCOUNT,
    Matcher,
    RecordedRefund,
)
from cancel_scanner.gateway.emulator.server import MAX_BODY_BYTES, Server
from cancel_scanner.gateway.emulator.signing import AUTH_SCHEME, MAX_CLOCK_SKEW_SECONDS, Signer
from cancel_scanner.gateway.keys import KeyMaterial

__all__ = [
    "APPLY_QPS",
    "AUTH_SCHEME",
    "BEIJING",
    "LEGACY_ALL_COLUMNS",
    "MAX_BODY_BYTES",
    "MAX_CLOCK_SKEW_SECONDS",
    "MAX_REFUNDS_PER_ORDER",
    "NOTIFY_RETRY_DELAYS_SECONDS",
    "NOTIFY_TIMEOUT_SECONDS",
    "QPS_WINDOW_SECONDS",
    "QUERY_QPS",
    "REFUNDS_PATH",
    "REQUEST_LOG_SIZE",
    "STATUS_ABNORMAL",
    "STATUS_CLOSED",
    "STATUS_PROCESSING",
    "STATUS_SUCCESS",
    "SUCCESS_DELAY_SECONDS",
    "TICK_SECONDS",
    "USER_RECEIVED_ACCOUNT",
    "Emulator",
    "FaultHooks",
    "Matcher",
    "NotificationAttempt",
    "RecordedRefund",
]

_log = logger.bind(component="emulator")


class Emulator(RequestHandling, RefundLedger, PaymentDesk, NotificationSender, BillDesk):
    """The emulated gateway. Attributes without a leading underscore may be read or set at any time
    (`keys` excepted: the emulator signs and checks with the keys it was built with).

    Its controls and readings live with their concept: the refund ones (force_status, close_refunds_for,
    tick, recorded, ...) in gateway.emulator.ledger, the request ones (in_flight, logged_requests,
    forget_requests) in gateway.emulator.exchange; snapshot() and the hand-over to the fault hooks here.
    """

    def __init__(
        self,
        keys: KeyMaterial,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        success_delay: float = SUCCESS_DELAY_SECONDS,
        clock: Callable[[], float] = time.time,
        wire_clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        apply_qps: int | None = APPLY_QPS,
        query_qps: int | None = QUERY_QPS,
        faults: FaultHooks | None = None,
        notify_url: str | None = None,
        strict_payments: bool = False,
        min_refund_interval: float | None = None,
        max_clock_skew: float = MAX_CLOCK_SKEW_SECONDS,
        notify_retry_delays: tuple[float, ...] = NOTIFY_RETRY_DELAYS_SECONDS,
        latency: tuple[float, float] | None = None,
        request_log_size: int = REQUEST_LOG_SIZE,
    ) -> None:
        self.keys = keys
        self.host, self.port = host, port
        self.max_clock_skew = max_clock_skew

        self._clock = clock
        self._monotonic = monotonic
        self._signer = Signer(keys, wire_clock or clock)

        # One lock for all state; the condition wakes wait_for(), the ticker and the sender.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.faults = faults
        self._init_requests(apply_qps, query_qps, latency, request_log_size)
        self._init_ledger(success_delay, strict_payments, min_refund_interval)
        self._init_payments()
        self._init_bills()
        self._init_notifications(notify_url, notify_retry_delays)

        self._stopping = threading.Event()
        self._server: Server | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Emulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = Server((self.host, self.port), self._exchange)
        self._threads = [
            threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator-http", daemon=True
            ),
            threading.Thread(target=self._tick_loop, name="emulator-ticker", daemon=True),
            threading.Thread(target=self._send_loop, name="emulator-notify", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        _log.bind(base_url=self.base_url).debug("emulator listening")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        server.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls: faults, and those spanning the mixins -----------------------

    @property
    def faults(self) -> FaultHooks:
        """The fault hooks (gateway.emulator.hooks) the exchange and the bills call; NoFaults by default."""
        return self._faults

    @faults.setter
    def faults(self, hooks: FaultHooks | None) -> None:
        if hooks is not None and not isinstance(hooks, FaultHooks):
            raise TypeError(
                "faults must implement gateway.emulator.hooks.FaultHooks (e.g. a test's"
                f" testsupport.emulator_faults.EmulatorFaults(plan)), not {type(hooks).__name__}"
            )
        self._faults = hooks if hooks is not None else NoFaults()

    def fail_next(self, number: str, kind: str, times: int = 1, **options: Any) -> None:
        """Test-only: the next `times` calls for this number fail with `kind`. The kinds and options are
        the fault hooks' (testsupport.emulator_faults, which the package does not ship)."""
        self._aimed("fail_next")(number, kind, times, **options)

    def spoil_next_download(self, kind: str, times: int = 1, **options: Any) -> None:
        """Test-only: the next `times` bill downloads fail with `kind` (testsupport.bill_faults)."""
        self._aimed("spoil_next_download")(kind, times, **options)

    def _aimed(self, control: str) -> Callable[..., None]:
        aim = getattr(self.faults, control, None)
        if aim is None:
            raise RuntimeError(
                f"Emulator.{control}: this emulator's fault hooks ({type(self.faults).__name__}) cannot aim faults;"
                " build it with faults=testsupport.emulator_faults.EmulatorFaults() (test code, not shipped)"
            )
        return aim

    def clear_rules(self) -> None:
        """Forget the close and abnormal rules and the faults aimed at numbers (the hooks' clear())."""
        with self._lock:
            self._clear_refund_rules()
            self.faults.clear()

    def snapshot(self) -> dict[str, dict]:
        """Copies of the counters a test checks and reports, all taken at one instant (under the lock):
        refunds_created, fen_refunded, max_in_flight, requests and faults_injected."""
        with self._lock:
            return {
                "refunds_created": dict(self.refunds_created),
                "fen_refunded": dict(self.fen_refunded),
                "max_in_flight": dict(self.max_in_flight),
                "requests": dict(self.requests),
                "faults_injected": dict(self.faults_injected),
                "payment_counts": dict(self.payment_counts),
                "abnormal_applies": dict(self.abnormal_applies),
                # out_trade_no -> when each of its refunds was created (the emulator's clock), in order
                "refunds_at": {no: [r.created_at for r in made] for no, made in self._refunds_by_order.items()},
            }

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds (evaluated under the emulator's lock), at most timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True
