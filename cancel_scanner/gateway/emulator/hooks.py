"""Where a test may make the emulator misbehave: the FaultHooks protocol, and NoFaults, the default.

On its own the emulator answers as WeChat Pay does. Fault injection (errors, slow answers, dropped
connections, bad signatures, redirects, trickled and huge answers, spoiled bill downloads) is test
code and does not ship: testsupport/emulator_faults.py implements these hooks, and a test or
benchmark passes them as `Emulator(..., faults=...)` (or `start_sandbox(faults=...)`). The
emulator calls them at three points, each under its one lock:

* gateway.emulator.exchange, once per API call (apply, query, abnormal, pay_query, pay_close; not the
  bill calls), after authentication and the QPS check: `draw(call, number)`. A Strike it returns is
  counted in `faults_injected` under its `label`; its `before` may answer instead of processing
  (None: process), its `after` may spoil the processed answer. Both run outside the lock.
* gateway.emulator.bills, once per bill download: `draw_download()`. A DownloadStrike is counted in
  `bill_counts["spoiled/<label>"]` and gives the download's answer.
* `Emulator.clear_rules()`: `clear()`, to forget the faults aimed at numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cancel_scanner.gateway.emulator.replies import FileReply, Reply


@dataclass(frozen=True)
class ApiCall:
    """One API call as a strike sees it."""

    kind: str  # apply, query, abnormal, pay_query or pay_close
    number: str | None  # its out_refund_no (apply, query, abnormal) or out_trade_no (pay_query, pay_close)
    body: bytes
    clock: Callable[[], float]  # the emulator's clock (epoch seconds)
    stopping: threading.Event  # set when the emulator stops: a strike that waits must wait on it


class Strike(Protocol):
    """A fault drawn for one API call."""

    @property
    def label(self) -> str:
        """How `faults_injected` counts it, e.g. "500/after"."""
        ...

    def before(self, call: ApiCall) -> Reply | None:
        """The answer instead of processing the call, or None to process it."""
        ...

    def after(self, call: ApiCall, reply: Reply) -> Reply:
        """The answer that leaves, given the processed one."""
        ...


class DownloadStrike(Protocol):
    """A fault drawn for one bill download."""

    @property
    def label(self) -> str:
        """How `bill_counts` counts it: "spoiled/<label>"."""
        ...

    def answer(self, bill: bytes, deliver: Callable[[bytes], FileReply]) -> Reply:
        """The download's answer; deliver(bill) is the normal one (gzip when the apply asked)."""
        ...


@runtime_checkable
class FaultHooks(Protocol):
    def draw(self, call: str, number: str | None) -> Strike | None: ...

    def draw_download(self) -> DownloadStrike | None: ...

    def clear(self) -> None: ...


class NoFaults:
    """The default: the emulator answers every call as WeChat would. No attributes to set (a test's
    `emulator.faults.plan = ...` on it fails rather than doing nothing)."""

    __slots__ = ()

    def draw(self, call: str, number: str | None) -> Strike | None:
        return None

    def draw_download(self) -> DownloadStrike | None:
        return None

    def clear(self) -> None:
        pass
