"""What a bill download can do wrong on purpose (test code, not shipped): a bad hash, a trickle, a huge
body, a gzip bomb, a redirect, a 500, a dropped connection.

Aimed with `emulator.spoil_next_download(kind, times=1, **options)` on an emulator built with
testsupport.emulator_faults.EmulatorFaults (whose draw_download() hands them to the emulator's
bills in the order they were aimed):

* "bad_hash": one amount changed after hashing: only the SHA1 can tell;
* "trickle": the file leaves a byte at a time (`trickle_gap`, `trickle_bytes`);
* "huge": `huge_bytes` on the wire (`huge_chunked`: without Content-Length);
* "bomb": a gzip that inflates to `huge_bytes`;
* "redirect": `redirect_status` to `redirect_to`; "500"; "drop".

They strike downloads only; QPS limits and the FaultPlan leave bill calls alone. The emulator counts
each in `bill_counts["spoiled/<kind>"]`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cancel_scanner.gateway.emulator.replies import ERRORS, FileReply, Pace, Reply, Stream, error_reply
from testsupport.emulator_faults import DEFAULT_HUGE_BYTES, DEFAULT_TRICKLE_GAP_SECONDS, PIECE_BYTES, REDIRECT_STATUSES

DOWNLOAD_FAULTS = frozenset({"bad_hash", "trickle", "huge", "bomb", "redirect", "500", "drop"})


@dataclass
class DownloadFault:
    kind: str
    times: int = 1
    trickle_gap: float = DEFAULT_TRICKLE_GAP_SECONDS
    trickle_bytes: int | None = None
    huge_bytes: int = DEFAULT_HUGE_BYTES
    huge_chunked: bool = False
    redirect_status: int = 302
    redirect_to: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in DOWNLOAD_FAULTS:
            raise ValueError(f"unknown download fault {self.kind!r}; one of {sorted(DOWNLOAD_FAULTS)}")
        if self.redirect_status not in REDIRECT_STATUSES:
            raise ValueError(f"redirect_status must be one of {sorted(REDIRECT_STATUSES)}")
        if self.times < 1 or self.huge_bytes < 0 or self.trickle_gap < 0:
            raise ValueError("times must be positive; huge_bytes and trickle_gap cannot be negative")

    @property
    def label(self) -> str:
        return self.kind

    def answer(self, bill: bytes, deliver: Callable[[bytes], FileReply]) -> Reply:
        """The download's answer: one of its own instead of the bill, or the bill's own, spoiled."""
        if self.kind == "500":
            return error_reply(*ERRORS["500"])
        if self.kind == "drop":
            return Reply(drop=True)
        if self.kind == "redirect":
            return Reply(self.redirect_status, redirect_to=self.redirect_to)
        if self.kind == "huge":
            return FileReply(200, stream=Stream(self.huge_bytes, _padding(self.huge_bytes), chunked=self.huge_chunked))
        if self.kind == "bomb":
            return FileReply(200, body=_bomb(self.huge_bytes))
        if self.kind == "bad_hash":
            # A changed amount still parses: only the hash shows the bill is not the one WeChat hashed.
            return deliver(bill.replace(b".00", b".01", 1) if b".00" in bill else bill + b" ")
        reply = deliver(bill)  # trickle
        reply.pace = Pace(self.trickle_gap, self.trickle_bytes)
        return reply


def _padding(size: int) -> Callable[[], Iterator[bytes]]:
    piece = b"x" * PIECE_BYTES

    def pieces() -> Iterator[bytes]:
        full, rest = divmod(size, len(piece))
        for _ in range(full):
            yield piece
        if rest:
            yield piece[:rest]

    return pieces


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
