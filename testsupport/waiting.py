"""The one way tests and benchmarks wait: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def wait_until(
    probe: Callable[[], Any],
    timeout: float,
    what: str = "a condition",
    *,
    until: Callable[[Any], bool] = bool,
    interval: float = 0.1,
    daemons: Sequence[Any] = (),
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll ``probe()`` until ``until(value)`` holds; return the value.

    Raises ``error`` (AssertionError unless told) naming ``what`` and the last value seen when the
    deadline passes, or at once if one of ``daemons`` (anything with ``started``, ``alive``,
    ``exit_expected``, ``name``, ``returncode`` and ``tail()``, such as
    ``testsupport.processes.DaemonProcess``) died meanwhile, with its log tail.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        for daemon in daemons:
            if daemon.started and not daemon.alive and not daemon.exit_expected:
                raise error(
                    f"{daemon.name} exited with {daemon.returncode} while waiting for {what}; last seen: {value!r}\n"
                    + daemon.tail()
                )
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {value!r}")
        time.sleep(interval)


def timed_wait(
    probe: Callable[[], Any],
    timeout: float,
    what: str = "a condition",
    *,
    interval: float = 0.1,
    error: type[Exception] = TimeoutError,
) -> float:
    """``wait_until``, returning the seconds waited instead of the value (the benchmarks' clock)."""
    started = time.monotonic()
    wait_until(probe, timeout, what, interval=interval, error=error)
    return time.monotonic() - started
