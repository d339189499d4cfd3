"""The notification endpoint's HTTP transport: one event-loop thread (selectors/epoll) and a fixed pool
of worker threads, so an idle connection costs a socket and no thread (see gateway/notify.py for the
rules it keeps: deadlines that trickling bytes do not extend, eviction of the longest-waiting
connection, answers from the headers alone for what is refused). Nothing here logs headers, bodies
or key material.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import selectors
import socket
import threading
import time
import traceback
from collections import OrderedDict
from http import HTTPStatus
from queue import SimpleQueue
from typing import Protocol, TypedDict

from loguru import logger

MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 256
WORKERS = 4
LISTEN_BACKLOG = 1024  # the loop drains it quickly; a deep backlog absorbs a connect burst without refusals
RECV_BYTES = 16 * 1024
LINGER_SECONDS = 1.0  # how long a closing connection may take to send its last bytes and hang up
LINGER_BYTES = 256 * 1024
ACCEPT_BATCH = 64  # accepts per loop turn, so a connect flood cannot starve connections already open
REPORT_EVERY_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0

_log = logger.bind(component="notify")

# Connection states. Only BUSY connections are outside the loop's eviction order and deadlines.
_READING, _BUSY, _WRITING, _CLOSING = "reading", "busy", "writing", "closing"


def _describe(exc: BaseException, *, with_message: bool = False) -> str:
    """The exception's type and where it was raised, for a log line.

    Not a loguru traceback: with `diagnose` (loguru's default) it prints the frames'
    variables, and these frames hold the signature headers, the body and the key.
    The message is included only for our own hook's errors, whose messages we write.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = f"{type(exc).__name__}: {exc}" if with_message else type(exc).__name__
    return text + where


class Answerer(Protocol):
    """What the transport serves: where it listens, the one path it answers, and the answer to a request on it."""

    host: str
    port: int
    path: str

    def _answer(self, headers: http.client.HTTPMessage, body: bytes) -> tuple[int, str]: ...


class _Limits(TypedDict):
    """NotifyServer's limits, as _Transport takes them."""

    idle_timeout: float
    max_connections: int
    workers: int
    max_body: int


class _Head:
    """A parsed request line and headers."""

    __slots__ = ("method", "path", "headers", "size", "keep_alive", "length")

    def __init__(self, method: str, path: str, headers: http.client.HTTPMessage, size: int, keep_alive: bool) -> None:
        self.method, self.path, self.headers, self.size, self.keep_alive = method, path, headers, size, keep_alive
        self.length = 0  # the body's, once _body_length accepted it


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _parse_head(buf: bytearray) -> _Head | None:
    """The request head at the start of buf; None while incomplete; raises _Refusal when unusable."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise _Refusal(431, "request headers too large")
        return None
    line, _, rest = bytes(buf[: end + 4]).partition(b"\r\n")
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refusal(400, "malformed request line")
    method, target, version = parts
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except (http.client.HTTPException, ValueError):
        raise _Refusal(400, "malformed headers") from None
    tokens = ",".join(headers.get_all("Connection") or ()).lower()
    # HTTP/1.0 keep-alive is rare and needs an echoed header; close those instead.
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    return _Head(method, target.split("?", 1)[0], headers, end + 4, keep_alive)


def _body_length(head: _Head, path: str, cap: int) -> int:
    """The Content-Length to read, or _Refusal; decided from the headers alone so nothing oversized is read."""
    if head.path != path:
        raise _Refusal(404, "not found")
    if head.method != "POST":
        raise _Refusal(405, "only POST is accepted")
    if head.headers.get("Transfer-Encoding") is not None:
        # A chunked body's size is unknown until read; WeChat sends Content-Length, so refuse rather than stream.
        raise _Refusal(411, "send the body with a Content-Length")
    values = {value.strip() for value in head.headers.get_all("Content-Length") or ()}
    # Digits only (int() would take "+1" or "1_0"), and exactly one value, or proxies and we could disagree.
    length = int(values.pop()) if len(values) == 1 and next(iter(values)).isdigit() else -1
    if length <= 0:
        raise _Refusal(400, "missing or malformed Content-Length")
    if length > cap:
        raise _Refusal(413, f"body over {cap} bytes")
    return length


def _response(status: int, message: str, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    body = b""
    if status != 204:  # a 204 carries neither a body nor a Content-Length
        code = "SUCCESS" if status < 300 else "FAIL"
        body = json.dumps({"code": code, "message": message}).encode("utf-8")
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- transport ----------------------------------------------------------------------


class _Conn:
    """One client connection; its socket and buffer are touched only by the loop thread."""

    __slots__ = ("sock", "buf", "state", "deadline", "events", "head", "out", "keep_alive", "drained", "closed")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.buf, self.state, self.deadline = sock, bytearray(), _READING, deadline
        self.head: _Head | None = None
        self.out, self.keep_alive, self.closed = b"", False, False
        self.events = self.drained = 0


class _Transport:
    """The event loop: accepts, frames requests, enforces deadlines and the cap, writes answers."""

    def __init__(self, owner: Answerer, *, idle_timeout: float, max_connections: int, workers: int, max_body: int):
        self._owner = owner
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_body = max_body
        self._tick = min(0.25, idle_timeout / 4)
        self._listener = socket.create_server((owner.host, owner.port), backlog=LISTEN_BACKLOG)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()  # workers wake the loop with a byte
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._accepting = True
        # Loop-owned connections, least recently active first: the eviction order.
        self._conns: OrderedDict[_Conn, None] = OrderedDict()
        self._busy: set[_Conn] = set()
        self._jobs: SimpleQueue[tuple[_Conn, _Head, bytes] | None] = SimpleQueue()
        self._answers: SimpleQueue[tuple[_Conn, bytes]] = SimpleQueue()
        self._stopping = threading.Event()
        self._shed = self._expired = 0
        self._next_report = time.monotonic() + REPORT_EVERY_SECONDS
        self._threads = [threading.Thread(target=self._serve, name="notify-http", daemon=True)] + [
            threading.Thread(target=self._work, name=f"notify-worker-{n}", daemon=True) for n in range(workers)
        ]

    @property
    def open_connections(self) -> int:
        return len(self._conns) + len(self._busy)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Close everything; returns within STOP_TIMEOUT_SECONDS even if a hook hangs (workers are daemons)."""
        self._stopping.set()
        self._wake()
        for _ in self._threads[1:]:
            self._jobs.put(None)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake is already pending) or closed (the loop is gone)
            pass

    # -- the loop ------------------------------------------------------------------

    def _serve(self) -> None:
        next_sweep = time.monotonic() + self._tick
        try:
            while not self._stopping.is_set():
                for key, events in self._selector.select(max(0.0, next_sweep - time.monotonic())):
                    try:
                        self._dispatch_event(key, events)
                    except Exception as exc:  # noqa: BLE001
                        # A dead loop would leave the endpoint silently deaf: drop the one connection, go on.
                        _log.bind(error=_describe(exc)).warning("notify server event failed")
                        if isinstance(key.data, _Conn):
                            self._close(key.data)
                self._collect_answers()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + self._tick
        finally:
            self._close_all()

    def _dispatch_event(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self._listener:
            self._accept_some()
        elif key.fileobj is self._wake_r:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
        else:
            conn: _Conn = key.data
            if not conn.closed and events & selectors.EVENT_READ:
                self._on_readable(conn)
            if not conn.closed and events & selectors.EVENT_WRITE:
                self._write(conn)

    def _accept_some(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # e.g. ECONNABORTED: that client is gone, the next may not be
                # Out of descriptors: shed an idle connection to make room, or stop polling the
                # listener (it stays readable, so it would spin) until the sweep frees one.
                if not self._shed_oldest():
                    self._selector.unregister(self._listener)
                    self._accepting = False
                    return
                continue
            if self.open_connections >= self._max_connections and not self._shed_oldest():
                sock.close()  # every connection is with a worker: refuse at once, no thread spent
                continue
            self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, time.monotonic() + self._idle_timeout)
        self._conns[conn] = None
        self._watch(conn, selectors.EVENT_READ)

    def _shed_oldest(self) -> bool:
        """Close the least recently active loop-owned connection; False if there is none."""
        if not self._conns:
            return False
        self._close(next(iter(self._conns)))
        self._shed += 1
        return True

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self._conns if c.deadline <= now]:
            if conn.state == _READING:
                self._expired += 1
            self._close(conn)
        if not self._accepting and self.open_connections < self._max_connections:
            self._selector.register(self._listener, selectors.EVENT_READ)
            self._accepting = True
        if now >= self._next_report:
            self._report(now)

    def _report(self, now: float) -> None:
        # One line a minute at most: an attack must not turn into a log flood.
        if self._shed or self._expired:
            _log.bind(shed=self._shed, timed_out=self._expired, open=self.open_connections).warning(
                "notify server closed idle or slow connections (connection cap or idle timeout)"
            )
        self._shed = self._expired = 0
        self._next_report = now + REPORT_EVERY_SECONDS

    # -- one connection --------------------------------------------------------------

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
        elif conn.state == _CLOSING:
            conn.drained += len(data)  # discarded: only read so our answer is not lost to a reset
            if conn.drained > LINGER_BYTES:
                self._close(conn)
        else:
            conn.buf += data
            self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Hand a complete request to a worker, refuse an unusable one, or wait for more bytes."""
        if conn.head is None:
            while conn.buf.startswith(b"\r\n"):  # stray line ends between requests are allowed
                del conn.buf[:2]
            try:
                head = _parse_head(conn.buf)
                if head is None:
                    return
                head.length = _body_length(head, self._owner.path, self._max_body)
            except _Refusal as refusal:
                self._answer(conn, _response(refusal.status, refusal.message, close=True), keep_alive=False)
                return
            conn.head = head
        head = conn.head
        length = head.length
        if len(conn.buf) < head.size + length:
            return  # the deadline set at accept bounds how long this may take
        body = bytes(conn.buf[head.size : head.size + length])
        del conn.buf[: head.size + length]
        conn.head, conn.keep_alive, conn.state = None, head.keep_alive, _BUSY
        self._watch(conn, 0)
        del self._conns[conn]
        self._busy.add(conn)
        self._jobs.put((conn, head, body))

    def _collect_answers(self) -> None:
        while not self._answers.empty():
            conn, response = self._answers.get()
            if conn in self._busy:  # else closed meanwhile
                self._busy.discard(conn)
                self._answer(conn, response, keep_alive=conn.keep_alive)

    def _answer(self, conn: _Conn, response: bytes, *, keep_alive: bool) -> None:
        conn.out, conn.keep_alive = response, keep_alive
        self._enter(conn, _WRITING, self._idle_timeout)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
        elif conn.keep_alive:
            self._enter(conn, _READING, self._idle_timeout)
            self._watch(conn, selectors.EVENT_READ)
            if conn.buf:
                self._advance(conn)
        else:
            self._close_gracefully(conn)

    def _close_gracefully(self, conn: _Conn) -> None:
        # Closing with unread bytes (a refused body) makes the kernel send a reset, which can
        # destroy our answer before the client reads it: half-close, then drain for a moment.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._enter(conn, _CLOSING, LINGER_SECONDS)
        self._watch(conn, selectors.EVENT_READ)

    def _enter(self, conn: _Conn, state: str, timeout: float) -> None:
        conn.state, conn.deadline = state, time.monotonic() + timeout
        self._conns[conn] = None
        self._conns.move_to_end(conn)  # most recently active: last to be shed

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn, None)
        self._busy.discard(conn)
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in [*self._conns, *self._busy]:
            self._close(conn)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # -- workers ---------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._stopping.is_set():
                continue  # the connection is closed already: no one would read the answer
            conn, head, body = job
            status, message = self._owner._answer(head.headers, body)
            self._answers.put((conn, _response(status, message, close=not head.keep_alive)))
            self._wake()
