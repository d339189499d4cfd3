"""The WeChat Pay emulator's faults (test code, not shipped): which exist, how they are drawn, how they strike.

EmulatorFaults implements the emulator's fault hooks (cancel_scanner.gateway.emulator.hooks): a
test builds `Emulator(keys, faults=EmulatorFaults(plan))` (tests/gateway_fixtures.py, the
`sandbox` fixture and tests/acceptance/harness.py do), then aims faults with
`emulator.fail_next(...)` or replaces the random plan with `emulator.faults.plan = FaultPlan(...)`.
The emulator only calls the hooks; the faults, their drawing and their odd answers are all here,
and the bill download's in testsupport.bill_faults.

Kinds, for `Emulator.fail_next(number, kind, times=1, *, after_commit=False, call="apply", **options)`
(a FaultPlan draws the first five at random). `call` is "apply", "query", "pay_query" or
"pay_close" (the number then is an out_trade_no), or "any" (which also strikes "abnormal", the
apply-abnormal-refund call):

* "500", "503", "429": an error answer (SYSTEM_ERROR, SERVICE_UNAVAILABLE, FREQUENCY_LIMITED).
* "slow": the answer waits `slow_seconds`. Before commit the request sat in
  a queue: it is processed anyway after the wait.
* "drop": the connection closes without an answer.
* "bad_signature": a well-formed signature over other bytes. Before commit
  on apply: a refund object that was never recorded (a forged answer).
* "not_enough" (apply only), "sign_error": 403 NOT_ENOUGH, 401 SIGN_ERROR; before commit only.
* "invalid_request" (apply only): 400 INVALID_REQUEST, before commit only, also for a number
  WeChat already refunded: the refusal of a replay that the client must not believe blindly.
* "redirect": a `redirect_status` (301, 302, 303, 307 or 308; default 302)
  whose Location is `redirect_to` (a base URL; default: the emulator's own
  port on 127.0.0.2, where nothing listens) plus the request's path.
  Unsigned, empty body, as a proxy would send it.
* "trickle": the answer leaves one byte at a time, `trickle_gap` seconds
  apart (default 0.5), for `trickle_bytes` bytes (default None: all of it),
  then the rest at once. Before commit the answer is a 500 SYSTEM_ERROR.
* "huge": an answer of `huge_bytes` bytes (default 200 MB), written from a
  generator, so the emulator holds one 64 KiB piece whatever the size.
  `huge_status` (default 500) not 2xx: an error object padded to size,
  unsigned like a proxy's error page; 2xx (after commit only): the recorded
  refund object with a "padding" field in front, correctly signed (which
  hashes the whole stream first: keep a huge 2xx to a few MB in timed tests).
  `huge_chunked=True` sends it chunked, without Content-Length, so only
  counting tells the client it is too big.

Before or after commit: a fault before commit strikes before the refund is
recorded (no money moves: the client's retry creates it); with after_commit
it strikes on the real answer (money moved, but the client hears 5xx, 429,
silence, a redirect, a trickle, a flood or a tampered signature: the
dangerous case). A query records nothing; after_commit there means "spoil
the real answer" rather than "answer instead".
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cancel_scanner.gateway.emulator.hooks import ApiCall
from cancel_scanner.gateway.emulator.records import Refund, digits, invalid_apply_fields, refund_json
from cancel_scanner.gateway.emulator.replies import ERRORS, Pace, Reply, Stream, error_reply

if TYPE_CHECKING:
    from testsupport.bill_faults import DownloadFault

DEFAULT_SLOW_SECONDS = 2.0
DEFAULT_TRICKLE_GAP_SECONDS = 0.5
DEFAULT_HUGE_BYTES = 200 * 1000 * 1000
PIECE_BYTES = 64 * 1024

FAULT_KINDS = frozenset(
    {
        "500",
        "503",
        "429",
        "slow",
        "drop",
        "bad_signature",
        "not_enough",
        "sign_error",
        "invalid_request",
        "redirect",
        "trickle",
        "huge",
        "order_not_exist",
    }
)
BEFORE_COMMIT_ONLY = frozenset({"not_enough", "sign_error", "invalid_request", "order_not_exist"})
FAULT_CALLS = frozenset({"apply", "query", "pay_query", "pay_close", "any"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RESHAPED = frozenset({"redirect", "trickle", "huge"})  # faults about how an answer is delivered
_PAD = b"x" * PIECE_BYTES


@dataclass(frozen=True)
class FaultPlan:
    """Random faults, drawn per request. Probabilities are per request and must sum to at most 1.

    after_commit: the share of drawn faults that strike after the refund was
    recorded (0 = always before, 1 = always after; a bool works too).
    """

    p_5xx: float = 0.0
    p_429: float = 0.0
    p_slow: float = 0.0
    p_drop: float = 0.0
    p_bad_signature: float = 0.0
    slow_seconds: float = DEFAULT_SLOW_SECONDS
    after_commit: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        chances = (self.p_5xx, self.p_429, self.p_slow, self.p_drop, self.p_bad_signature, float(self.after_commit))
        if any(p < 0 or p > 1 for p in chances) or sum(chances[:5]) > 1:
            raise ValueError("fault probabilities must be within 0..1 and sum to at most 1")

    def draw(self, rng: random.Random) -> Fault | None:
        draw = rng.random()
        after = rng.random() < float(self.after_commit)
        for chance, kind in (
            (self.p_5xx, "500" if rng.random() < 0.5 else "503"),
            (self.p_429, "429"),
            (self.p_slow, "slow"),
            (self.p_drop, "drop"),
            (self.p_bad_signature, "bad_signature"),
        ):
            if draw < chance:
                return Fault(kind, after, self.slow_seconds, call="any")
            draw -= chance
        return None


@dataclass
class Fault:
    kind: str
    after_commit: bool
    slow_seconds: float = DEFAULT_SLOW_SECONDS
    call: str = "apply"
    times: int = 1
    redirect_status: int = 302
    redirect_to: str | None = None
    trickle_gap: float = DEFAULT_TRICKLE_GAP_SECONDS
    trickle_bytes: int | None = None
    huge_bytes: int = DEFAULT_HUGE_BYTES
    huge_status: int = 500
    huge_chunked: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.call not in FAULT_CALLS:
            raise ValueError(f"call must be one of {sorted(FAULT_CALLS)}")
        if self.after_commit and self.kind in BEFORE_COMMIT_ONLY:
            raise ValueError(f"{self.kind} refuses the refund, so it cannot strike after it was recorded")
        if self.kind in ("not_enough", "invalid_request") and self.call != "apply":
            raise ValueError(f"{self.kind} only answers refund applications")
        if self.kind == "order_not_exist" and self.call not in ("pay_query", "pay_close"):
            raise ValueError("order_not_exist only answers payment queries and closes")
        if self.redirect_status not in REDIRECT_STATUSES:
            raise ValueError(f"redirect_status must be one of {sorted(REDIRECT_STATUSES)}")
        if self.kind == "huge" and 200 <= self.huge_status < 300 and not self.after_commit:
            raise ValueError("a huge 2xx carries the recorded refund, so it strikes after commit only")
        if self.trickle_gap < 0 or self.huge_bytes < 0 or (self.trickle_bytes is not None and self.trickle_bytes < 0):
            raise ValueError("trickle_gap, trickle_bytes and huge_bytes cannot be negative")

    @property
    def label(self) -> str:
        """The kind and when it strikes, as the emulator counts it in `faults_injected`: "500/after", "slow/before"."""
        return f"{self.kind}/{'after' if self.after_commit else 'before'}"

    def before(self, call: ApiCall) -> Reply | None:
        """The answer that replaces processing, or None to process the request anyway (after the fault's effect)."""
        if self.after_commit:
            return None
        if self.kind in ERRORS:
            return error_reply(*ERRORS[self.kind])
        if self.kind == "drop":
            return Reply(drop=True)
        if self.kind == "slow":
            # Queued, then processed anyway: the caller has long given up by then.
            return Reply(drop=True) if call.stopping.wait(self.slow_seconds) else None
        if self.kind == "bad_signature":
            # A forged answer only makes sense for an application: a query records nothing to forge.
            forged = forged_refund(call.body, call.clock) if call.kind == "apply" else None
            return None if forged is None else Reply(200, forged, tamper=True)
        if self.kind in _RESHAPED:
            return self._reshape(error_reply(*ERRORS["500"]))
        return None

    def after(self, call: ApiCall, reply: Reply) -> Reply:
        """Spoil the real (2xx) answer of a request that was processed; any other answer leaves as it is."""
        # A query records nothing, so a bad signature on it can only tamper the real answer.
        strikes = self.after_commit or (call.kind in ("query", "pay_query") and self.kind == "bad_signature")
        if not strikes or not 200 <= reply.status < 300:
            return reply
        if self.kind in ERRORS:
            return error_reply(*ERRORS[self.kind])
        if self.kind == "drop":
            return Reply(drop=True)
        if self.kind == "slow":
            reply.delay = self.slow_seconds
        elif self.kind == "bad_signature":
            reply.tamper = True
        elif self.kind in _RESHAPED:
            return self._reshape(reply)
        return reply

    def _reshape(self, reply: Reply) -> Reply:
        if self.kind == "redirect":
            return Reply(self.redirect_status, redirect_to=self.redirect_to)
        if self.kind == "trickle":
            reply.pace = Pace(self.trickle_gap, self.trickle_bytes)
        elif self.kind == "huge":
            if not 200 <= self.huge_status < 300:
                reply = error_reply(self.huge_status, "SYSTEM_ERROR", "system error")
            length, pieces = padded(reply.encoded(), self.huge_bytes)
            # Only a 2xx is signed (over the whole stream); a huge error is a proxy's page.
            reply.stream = Stream(length, pieces, chunked=self.huge_chunked, signed=200 <= reply.status < 300)
        return reply


class EmulatorFaults:
    """The emulator's fault hooks: the faults waiting to strike, those aimed at one number first, else a
    draw from the plan; and the bill downloads' (testsupport.bill_faults), in the order they were aimed.

    Locked on its own: the emulator calls draw() under its lock, a test aims from its own thread.
    """

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self._lock = threading.Lock()
        self._aimed: dict[str, list[Fault]] = {}
        self._downloads: list[DownloadFault] = []
        self.plan = plan

    @property
    def plan(self) -> FaultPlan | None:
        """The random faults (None: none); setting it reseeds the draw with the new plan's seed."""
        return self._plan

    @plan.setter
    def plan(self, plan: FaultPlan | None) -> None:
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed if plan else None)

    # -- what a test calls (through Emulator.fail_next and Emulator.spoil_next_download) ----------

    def fail_next(
        self,
        number: str,
        kind: str,
        times: int = 1,
        *,
        after_commit: bool = False,
        call: str = "apply",
        slow_seconds: float | None = None,
        **options: Any,
    ) -> None:
        """Make the next `times` calls (`call`: apply, query, pay_query, pay_close or any) for this number
        fail with `kind`. `options` are the kind's own (see the module docstring): redirect_status,
        redirect_to, trickle_gap, trickle_bytes, huge_bytes, huge_status, huge_chunked."""
        with self._lock:
            if slow_seconds is None:
                slow_seconds = self._plan.slow_seconds if self._plan else DEFAULT_SLOW_SECONDS
            fault = Fault(kind, after_commit, slow_seconds, call=call, times=times, **options)
            self._aimed.setdefault(number, []).append(fault)

    def spoil_next_download(self, kind: str, times: int = 1, **options: Any) -> None:
        """The next `times` bill downloads fail with `kind` (testsupport.bill_faults)."""
        from testsupport.bill_faults import DownloadFault  # it imports this module's defaults

        fault = DownloadFault(kind, times, **options)
        with self._lock:
            self._downloads.append(fault)

    # -- the hooks the emulator calls (cancel_scanner.gateway.emulator.hooks.FaultHooks) -------------

    def draw(self, call: str, number: str | None) -> Fault | None:
        """The fault that strikes this call (apply, query, abnormal, pay_query, pay_close) for this number, if any."""
        with self._lock:
            aimed = self._aimed.get(number or "", [])
            for fault in aimed:
                if fault.call in (call, "any"):
                    fault.times -= 1
                    if fault.times <= 0:
                        aimed.remove(fault)
                    return fault
            return self._plan.draw(self._rng) if self._plan is not None else None

    def draw_download(self) -> DownloadFault | None:
        with self._lock:
            if not self._downloads:
                return None
            fault = self._downloads[0]
            fault.times -= 1
            if fault.times <= 0:
                self._downloads.pop(0)
            return fault

    def clear(self) -> None:
        """Forget the faults aimed at numbers (Emulator.clear_rules); not the plan, nor those aimed at downloads."""
        with self._lock:
            self._aimed.clear()


def forged_refund(body: bytes, clock: Callable[[], float]) -> dict[str, Any] | None:
    """A refund object echoing the request that was never recorded; None if the request is malformed."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if invalid_apply_fields(data) is not None:
        return None
    forged = Refund(
        refund_id=digits("50", 32),
        out_refund_no=data["out_refund_no"],
        out_trade_no=str(data.get("out_trade_no") or ""),
        transaction_id=str(data.get("transaction_id") or ""),
        refund=data["amount"]["refund"],
        total=data["amount"]["total"],
        notify_url=None,
        created_at=clock(),
    )
    return refund_json(forged)


def padded(payload: bytes, size: int) -> tuple[int, Callable[[], Iterator[bytes]]]:
    """The JSON object `payload` with a "padding" field in front, `size` bytes long (or as short as it can be).

    Returns the length and a function giving the body piece by piece, anew
    each time (once to sign it, once to send it), from one shared buffer.
    """
    prefix = b'{"padding":"'
    suffix = b'"}' if payload.strip() == b"{}" else b'",' + payload.lstrip()[1:]
    pad = max(0, size - len(prefix) - len(suffix))

    def pieces() -> Iterator[bytes]:
        yield prefix
        full, rest = divmod(pad, PIECE_BYTES)
        for _ in range(full):
            yield _PAD
        if rest:
            yield _PAD[:rest]
        yield suffix

    return len(prefix) + pad + len(suffix), pieces
