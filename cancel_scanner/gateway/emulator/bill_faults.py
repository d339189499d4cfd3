"""What a bill download can do wrong on purpose (the emulator's tests of the bill client): a bad hash,
a trickle, a huge body, a gzip bomb, a redirect, a 500, a dropped connection; and how a file answer
(unsigned bytes, not JSON) is written."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cancel_scanner.gateway import faults
from cancel_scanner.gateway.faults import Reply
from cancel_scanner.gateway.faults import error_reply as _error

DOWNLOAD_FAULTS = frozenset({"bad_hash", "trickle", "huge", "bomb", "redirect", "500", "drop"})


@dataclass
class DownloadFault:
    kind: str
    times: int = 1
    trickle_gap: float = faults.DEFAULT_TRICKLE_GAP_SECONDS
    trickle_bytes: int | None = None
    huge_bytes: int = faults.DEFAULT_HUGE_BYTES
    huge_chunked: bool = False
    redirect_status: int = 302
    redirect_to: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in DOWNLOAD_FAULTS:
            raise ValueError(f"unknown download fault {self.kind!r}; one of {sorted(DOWNLOAD_FAULTS)}")
        if self.redirect_status not in faults.REDIRECT_STATUSES:
            raise ValueError(f"redirect_status must be one of {sorted(faults.REDIRECT_STATUSES)}")
        if self.times < 1 or self.huge_bytes < 0 or self.trickle_gap < 0:
            raise ValueError("times must be positive; huge_bytes and trickle_gap cannot be negative")


@dataclass
class FileReply(Reply):
    """A download's answer: bytes rather than a JSON object, and unsigned (WeChat signs no bill).
    gateway.emulator.exchange hands it to write() instead of signing it."""

    body: bytes = b""
    pieces: Callable[[], Iterator[bytes]] | None = None  # a huge body, written piece by piece
    length: int = 0
    chunked: bool = False

    def write(self, handler: Any, request_id: str, stopping: threading.Event) -> None:
        headers = {"Content-Type": "application/octet-stream", "Request-ID": request_id}
        if self.pieces is not None:
            faults.write_streamed(handler, self.status, headers, self.length, self.pieces(), self.chunked)
            return

        def write() -> None:
            handler.write_reply(self.status, self.body, headers)

        if self.trickle is not None:
            faults.write_trickled(handler, self.trickle, stopping, write)
        else:
            write()


def _padding(size: int) -> tuple[int, Callable[[], Iterator[bytes]]]:
    piece = b"x" * faults.PIECE_BYTES

    def pieces() -> Iterator[bytes]:
        full, rest = divmod(size, len(piece))
        for _ in range(full):
            yield piece
        if rest:
            yield piece[:rest]

    return size, pieces


def _bomb(size: int) -> bytes:
    """A gzip file that inflates to `size` zero bytes (about size / 1000 bytes itself)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    out = []
    left = size
    while left > 0:
        out.append(deflate.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    out.append(deflate.flush())
    return b"".join(out)


def _strike(fault: DownloadFault) -> Reply | None:
    """The answer a download fault gives instead of the bill, or None when it spoils the bill's own."""
    if fault.kind == "500":
        return _error(*faults.ERRORS["500"])
    if fault.kind == "drop":
        return Reply(drop=True)
    if fault.kind == "redirect":
        return Reply(fault.redirect_status, redirect_to=fault.redirect_to)
    if fault.kind == "huge":
        length, pieces = _padding(fault.huge_bytes)
        return FileReply(200, pieces=pieces, length=length, chunked=fault.huge_chunked)
    if fault.kind == "bomb":
        return FileReply(200, body=_bomb(fault.huge_bytes))
    return None
