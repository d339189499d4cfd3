"""The emulator's faults: which exist, how they are drawn, and how their odd answers are written.

Kinds, for `Emulator.fail_next(number, kind, times=1, *, after_commit=False, call="apply", **options)`
(a FaultPlan draws the first five at random). `call` is "apply", "query", "pay_query" or
"pay_close" (the number then is an out_trade_no), or "any":

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

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
ERRORS = {
    "500": (500, "SYSTEM_ERROR", "system error, please retry with the same out_refund_no"),
    "503": (503, "SERVICE_UNAVAILABLE", "service unavailable, please retry"),
    "429": (429, "FREQUENCY_LIMITED", "requests are too frequent"),
    "not_enough": (403, "NOT_ENOUGH", "merchant balance is not enough"),
    "sign_error": (401, "SIGN_ERROR", "signature verification failed"),
    "invalid_request": (400, "INVALID_REQUEST", "the request does not match the refund on record"),
    # A payment query or close that wrongly says WeChat never saw the trade (signed, as WeChat's own errors).
    "order_not_exist": (404, "ORDER_NOT_EXIST", "order does not exist"),
}
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


class FaultBook:
    """The faults waiting to strike: those aimed at one refund number first, else a draw from the plan.

    Not locked: the emulator calls it under its own lock.
    """

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self._aimed: dict[str, list[Fault]] = {}
        self.replace_plan(plan)

    def replace_plan(self, plan: FaultPlan | None) -> None:
        """Draw from `plan` from now on (None: no random faults), reseeded with its seed."""
        self.plan = plan
        self._rng = random.Random(plan.seed if plan else None)

    @property
    def slow_seconds(self) -> float:
        """How long a "slow" fault waits unless told: the plan's, else the default."""
        return self.plan.slow_seconds if self.plan else DEFAULT_SLOW_SECONDS

    def aim(self, out_refund_no: str, fault: Fault) -> None:
        """`fault` strikes the next `fault.times` calls of `fault.call` for this number."""
        self._aimed.setdefault(out_refund_no, []).append(fault)

    def clear_aimed(self) -> None:
        self._aimed.clear()

    def draw(self, call: str, number: str | None) -> Fault | None:
        """The fault that strikes this call (apply, query, pay_query, pay_close) for this number, if any."""
        for fault in self._aimed.get(number or "", []):
            if fault.call in (call, "any"):
                fault.times -= 1
                if fault.times <= 0:
                    self._aimed[number or ""].remove(fault)
                return fault
        return self.plan.draw(self._rng) if self.plan is not None else None


@dataclass(frozen=True)
class Trickle:
    gap: float
    count: int | None  # None: every byte


@dataclass(frozen=True)
class Huge:
    size: int
    chunked: bool


@dataclass
class Reply:
    status: int = 200
    payload: dict[str, Any] | None = None
    tamper: bool = False
    delay: float = 0.0
    drop: bool = False
    redirect_to: str | None = None  # for a 3xx: the Location's base URL (None: the emulator's default)
    trickle: Trickle | None = None
    huge: Huge | None = None


def error_reply(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"code": code, "message": message})


def strike_before(fault: Fault, forge: Callable[[], dict[str, Any] | None], stopping: threading.Event) -> Reply | None:
    """The answer that replaces processing, or None to process the request anyway (after the fault's effect)."""
    if fault.kind in ERRORS:
        return error_reply(*ERRORS[fault.kind])
    if fault.kind == "drop":
        return Reply(drop=True)
    if fault.kind == "slow":
        # Queued, then processed anyway: the caller has long given up by then.
        return Reply(drop=True) if stopping.wait(fault.slow_seconds) else None
    if fault.kind == "bad_signature":
        forged = forge()
        return None if forged is None else Reply(200, forged, tamper=True)
    if fault.kind in _RESHAPED:
        return _reshape(fault, error_reply(*ERRORS["500"]))
    return None


def strike_after(fault: Fault, reply: Reply) -> Reply:
    """Spoil the real (2xx) answer of a request that was processed."""
    if fault.kind in ERRORS:
        return error_reply(*ERRORS[fault.kind])
    if fault.kind == "drop":
        return Reply(drop=True)
    if fault.kind == "slow":
        reply.delay = fault.slow_seconds
    elif fault.kind == "bad_signature":
        reply.tamper = True
    elif fault.kind in _RESHAPED:
        return _reshape(fault, reply)
    return reply


def _reshape(fault: Fault, reply: Reply) -> Reply:
    if fault.kind == "redirect":
        return Reply(fault.redirect_status, redirect_to=fault.redirect_to)
    if fault.kind == "trickle":
        reply.trickle = Trickle(fault.trickle_gap, fault.trickle_bytes)
    elif fault.kind == "huge":
        if not 200 <= fault.huge_status < 300:
            reply = error_reply(fault.huge_status, "SYSTEM_ERROR", "system error")
        reply.huge = Huge(fault.huge_bytes, fault.huge_chunked)
    return reply


# -- writing odd answers ---------------------------------------------------------------


class _TrickledWriter:
    """Stands in for a handler's wfile: the first `count` bytes leave one at a time, `gap` seconds apart."""

    def __init__(self, wfile: Any, trickle: Trickle, stopping: threading.Event) -> None:
        self._wfile = wfile
        self._gap = trickle.gap
        self._left = float("inf") if trickle.count is None else trickle.count
        self._stopping = stopping

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view and self._left > 0:
            self._wfile.write(view[:1])
            self._wfile.flush()
            view, self._left = view[1:], self._left - 1
            if self._stopping.wait(self._gap):
                raise ConnectionAbortedError("the emulator is stopping")
        if view:
            self._wfile.write(view)
        return len(data)

    def flush(self) -> None:
        self._wfile.flush()


def write_trickled(handler: Any, trickle: Trickle, stopping: threading.Event, write: Callable[[], None]) -> None:
    """Run `write` (which writes the whole answer to handler.wfile) with the bytes trickling out."""
    real = handler.wfile
    handler.wfile = _TrickledWriter(real, trickle, stopping)
    try:
        write()
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        handler.close_connection = True  # the client gave up waiting: what it should do
    finally:
        handler.wfile = real


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


def write_streamed(
    handler: Any, status: int, headers: dict[str, str], length: int, pieces: Iterator[bytes], chunked: bool
) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(length))))
    handler.end_headers()
    try:
        for piece in pieces:
            if chunked:
                handler.wfile.write(b"%x\r\n" % len(piece))
            handler.wfile.write(piece)
            if chunked:
                handler.wfile.write(b"\r\n")
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True  # the client stopped reading: what it should do
