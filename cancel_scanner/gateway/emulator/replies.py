"""The emulator's answers: what one is (a Reply, or a FileReply for a bill download) and how its body leaves.

A JSON answer is signed by gateway.emulator.exchange; a file is never signed (WeChat signs no bill).
A body leaves at once, paced (the first bytes one at a time), or streamed from a generator
(never held whole). The emulator's own answers use only the plain forms; the paced and streamed
ones, a tampered signature and a 3xx are there for fault hooks (gateway.emulator.hooks).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# WeChat Pay's error answers: (status, code, message), by the name the emulator and fault hooks use.
ERRORS = {
    "500": (500, "SYSTEM_ERROR", "system error, please retry with the same out_refund_no"),
    "503": (503, "SERVICE_UNAVAILABLE", "service unavailable, please retry"),
    "429": (429, "FREQUENCY_LIMITED", "requests are too frequent"),
    "not_enough": (403, "NOT_ENOUGH", "merchant balance is not enough"),
    "sign_error": (401, "SIGN_ERROR", "signature verification failed"),
    "invalid_request": (400, "INVALID_REQUEST", "the request does not match the refund on record"),
    # A payment query or close that says WeChat never saw the trade (signed, as WeChat's own errors).
    "order_not_exist": (404, "ORDER_NOT_EXIST", "order does not exist"),
}


@dataclass(frozen=True)
class Pace:
    """The first `count` bytes of the answer (None: all of them) leave one at a time, `gap` seconds apart."""

    gap: float
    count: int | None


@dataclass(frozen=True)
class Stream:
    """A body of `length` bytes given piece by piece: `pieces()` yields it anew on each call (once to
    sign it, once to send it). `chunked`: sent without Content-Length. `signed`: a JSON answer's
    signature covers the whole stream; unsigned, it goes out as a proxy's page would (a file never is)."""

    length: int
    pieces: Callable[[], Iterator[bytes]]
    chunked: bool = False
    signed: bool = False


@dataclass
class Reply:
    status: int = 200
    payload: dict[str, Any] | None = None
    tamper: bool = False  # a well-formed signature over other bytes
    delay: float = 0.0  # seconds before the answer leaves (none leaves if the emulator stops meanwhile)
    drop: bool = False  # the connection closes without an answer
    redirect_to: str | None = None  # for a 3xx: the Location's base URL (None: the emulator's default)
    pace: Pace | None = None
    stream: Stream | None = None  # the body, instead of the payload's JSON

    def encoded(self) -> bytes:
        """The payload as the wire carries it; a 204 (a close) has no body at all."""
        if self.status == 204:
            return b""
        return json.dumps(self.payload or {}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_reply(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"code": code, "message": message})


@dataclass
class FileReply(Reply):
    """A download's answer: bytes rather than a JSON object, and unsigned (WeChat signs no bill).
    gateway.emulator.exchange hands it to write() instead of signing it."""

    body: bytes = b""

    def write(self, handler: Any, request_id: str, stopping: threading.Event) -> None:
        headers = {"Content-Type": "application/octet-stream", "Request-ID": request_id}
        if self.stream is not None:
            write_streamed(handler, self.status, headers, self.stream)
            return

        def write() -> None:
            handler.write_reply(self.status, self.body, headers)

        if self.pace is not None:
            write_paced(handler, self.pace, stopping, write)
        else:
            write()


# -- writing a body ------------------------------------------------------------------------


class _PacedWriter:
    """Stands in for a handler's wfile: the first `count` bytes leave one at a time, `gap` seconds apart."""

    def __init__(self, wfile: Any, pace: Pace, stopping: threading.Event) -> None:
        self._wfile = wfile
        self._gap = pace.gap
        self._left = float("inf") if pace.count is None else pace.count
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


def write_paced(handler: Any, pace: Pace, stopping: threading.Event, write: Callable[[], None]) -> None:
    """Run `write` (which writes the whole answer to handler.wfile) with the bytes leaving at `pace`."""
    real = handler.wfile
    handler.wfile = _PacedWriter(real, pace, stopping)
    try:
        write()
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        handler.close_connection = True  # the client gave up waiting: what it should do
    finally:
        handler.wfile = real


def write_streamed(handler: Any, status: int, headers: dict[str, str], stream: Stream) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    chunked = stream.chunked
    handler.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(stream.length))))
    handler.end_headers()
    try:
        for piece in stream.pieces():
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
