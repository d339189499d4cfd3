"""The demo's screen: a progress display, not a log.

Every log record goes to a file next to the database; only warnings and errors
are echoed above the progress lines.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from loguru import logger

from cancel_scanner.demo.stages import SHORT_NAMES, STAGE_FAILED_LABEL
from cancel_scanner.engine.status import Status
from cancel_scanner.i18n import N_, cells, fit, pad, tr  # noqa: F401 - the screen helpers, shared with `status`

PLAIN_LINE_EVERY_SECONDS = 1.0  # without a terminal: one progress line a second at most
BAR_CELLS = 16
WIDTH = 80


@dataclass
class Frame:
    elapsed: float
    inserted: int
    total_requests: int
    status: Status
    expected: dict[str, int]
    wx: Counter  # refund_order.wx_status -> count ("" while not yet answered)
    created: int  # refunds the emulator created


class Display:
    """A block of progress lines, redrawn in place on a terminal; a compact line a second otherwise.

    Log records and notes are printed above the block, so they never tear it.
    """

    def __init__(self, out: TextIO, tty: bool, locale: str = "en"):
        self.out = out
        self.tty = tty
        self.locale = locale
        self._lock = threading.Lock()
        self._drawn = 0
        self._last_plain = -PLAIN_LINE_EVERY_SECONDS
        self._last_plain_text = ""
        self._block: list[str] = []
        self._hidden = False
        self.warnings = 0

    def _width(self) -> int:
        return max(40, min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns) - 1)

    def _erase(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        width = self._width()
        for line in self._block:
            self.out.write(fit(line, width) + "\x1b[K\n")
        self._drawn = len(self._block)
        self.out.flush()

    def start(self) -> None:
        if self.tty:
            self.out.write("\x1b[?25l")  # hide the cursor while redrawing
            self._hidden = True

    def finish(self) -> None:
        with self._lock:
            if self._hidden:
                self.out.write("\x1b[?25h")
                self._hidden = False
            self.out.flush()

    def say(self, line: str) -> None:
        """A line that stays on screen, above the progress block."""
        with self._lock:
            if self.tty:
                self._erase()
                self.out.write(fit(line, self._width()) + "\x1b[K\n")
                self._draw()
            else:
                self.out.write(line + "\n")
                self.out.flush()

    def log_sink(self, message: Any) -> None:
        record = message.record
        self.warnings += 1
        stage = record["extra"].get("stage", "-")
        ref = record["extra"].get("out_refund_no")
        self.say(f"  {record['level'].name.lower()} {stage}: {record['message']}" + (f" [{ref}]" if ref else ""))

    def show(self, frame: Frame, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                self._erase()
                self._block = render_block(frame, self.locale)
                self._draw()
                return
            body = render_plain(frame)
            due = frame.elapsed - self._last_plain >= PLAIN_LINE_EVERY_SECONDS
            if final or (due and body != self._last_plain_text):
                self.out.write(f"{frame.elapsed:5.1f}s  {body}\n")
                self.out.flush()
                self._last_plain = frame.elapsed
                self._last_plain_text = body


def _bar(done: int, total: int) -> str:
    filled = BAR_CELLS if total <= 0 else min(BAR_CELLS, round(BAR_CELLS * done / total))
    return "█" * filled + "░" * (BAR_CELLS - filled)


def render_block(f: Frame, locale: str = "en") -> list[str]:
    t = tr(locale)
    arrived = t(N_("merchants' requests arrived {n}/{total}")).format(n=f.inserted, total=f.total_requests)
    lines = [f"cancel-scanner demo  {f.elapsed:5.1f}s   {arrived}", ""]
    done, pending = t(N_("done")), t(N_("pending"))
    for s in f.status.stages:
        finished = (s.done or 0) + s.failed  # the demo collects with totals=True: done is counted
        total = max(f.expected.get(s.stage, 0), finished + s.pending)
        label = t(STAGE_FAILED_LABEL.get(s.stage, N_("failed")))
        lines.append(
            f"  {s.stage:16}{_bar(finished, total)} {finished:3}/{total:<3}"
            f"  {done} {s.done:<3} {pad(label, 8, right=True)} {s.failed:<3} {pending} {s.pending}"
        )
    states = "  ".join(f"{k} {v}" for k, v in sorted(f.wx.items()) if k)
    created = t(N_("WeChat Pay sandbox: {n} refunds created")).format(n=f.created)
    lines += ["", f"  {created}   {states}"]
    return lines


def render_plain(f: Frame) -> str:
    """One compact progress line (without the time): finished/total per stage."""
    parts = []
    for s in f.status.stages:
        finished = (s.done or 0) + s.failed  # the demo collects with totals=True: done is counted
        parts.append(
            f"{SHORT_NAMES.get(s.stage, s.stage)} {finished}/{max(f.expected.get(s.stage, 0), finished + s.pending)}"
        )
    return f"req {f.inserted}/{f.total_requests}  " + " ".join(parts)


def route_logs(log_file: TextIO, display: Display, json_lines: bool, level: str) -> int:
    """Every record to the file; warnings and errors also above the progress block. Returns the screen sink."""
    from cancel_scanner.engine.logs import setup_logging

    setup_logging(json_lines=json_lines, level=level, stream=log_file)

    def on_screen(record) -> bool:
        # APScheduler's own chatter (a skipped overlapping run) stays in the file.
        return not str(record["extra"].get("stage", "")).startswith("apscheduler")

    return logger.add(
        display.log_sink, level="WARNING", filter=on_screen, format="{message}", enqueue=False, diagnose=False
    )
