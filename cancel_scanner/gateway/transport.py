"""Bounded HTTP for the live client: one total deadline per call, a cap on every answer, no redirects.

`requests` alone cannot give a call a deadline or an answer a cap: its read
timeout is per socket read, so an answer trickled a byte at a time never times
out, and it reads bodies whole. So:

* A watchdog thread shuts down the sockets of a call still running at its
  deadline: the blocked read returns at once and the call ends as a timeout,
  whatever it was reading (status line, headers or body). It finds the
  sockets through connection classes that hand each socket they use to the
  current thread's call (`_Watched`); only our own sessions mount them.
  Not covered: a TLS handshake trickled byte by byte (the socket changes hands
  inside `ssl.wrap_socket`); the connect timeout, cut to the time left, bounds
  each of its reads.
* The body is read in chunks with stream=True, the clock checked and the
  socket timeout cut to the time left before each chunk. A declared or
  counted length over the cap stops the read and closes the connection, so
  memory is bounded by the cap whatever the body's size.
* Redirects are never followed, nor even prepared: requests reads a
  redirect's whole body before deciding whether to follow it, even with
  allow_redirects=False (`Session.resolve_redirects`), so our sessions see no
  redirect target at all.

Relies on urllib3 2.x (`HTTPConnection._new_conn`, `getresponse`,
`ConnectionCls`, `PoolManager.pool_classes_by_scheme`);
tests/integration/test_gateway_http.py fails if those stop being called.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.poolmanager
from requests.adapters import HTTPAdapter

from cancel_scanner.gateway.classify import AnswerTooLarge, CallNotSent

ANSWER_CHUNK_BYTES = 64 * 1024


def _shut(sock: socket.socket) -> None:
    try:
        # The plain socket's method, also for an SSLSocket: its own shutdown() drops the
        # TLS state under the feet of the thread reading it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing left to interrupt


class _Watch:
    """One call's deadline and the sockets it has used so far."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._armed = True
        self._fired = False

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if not self._armed:
                return
            if self._fired:
                _shut(sock)  # a socket handed over after the deadline is cut at once
            elif not any(known is sock for known in self._sockets):
                self._sockets.append(sock)

    def fire(self) -> None:
        # Under the lock, so that disarm() returning False means no socket of this call is shut.
        with self._lock:
            if not self._armed:
                return
            self._fired = True
            for sock in self._sockets:
                _shut(sock)

    @property
    def fired(self) -> bool:
        return self._fired

    def disarm(self) -> bool:
        """Stop watching; True if the deadline struck first (the call must then count as timed out)."""
        with self._lock:
            self._armed = False
            self._sockets = []  # pooled connections outlive the call: keep no reference to them
            return self._fired

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def cut_socket_timeout(self) -> None:
        """Make the next read on the call's socket give up no later than the deadline."""
        with self._lock:
            sock = self._sockets[-1] if self._sockets else None
        if sock is not None:
            try:
                sock.settimeout(max(self.time_left(), 0.001))
            except OSError:
                pass


class _Watchdog:
    """One daemon thread for the whole process: fires each watch at its deadline."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._changed:
            heapq.heappush(self._due, (deadline, next(self._seq), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gateway-watchdog", daemon=True)
                self._thread.start()
            if self._due[0][2] is watch:
                self._changed.notify()
        return watch

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                # Disarmed watches stay queued until their deadline: firing one is a no-op,
                # and it spares every call a search of the heap.
                while self._due and self._due[0][0] <= now:
                    heapq.heappop(self._due)[2].fire()
                self._changed.wait(self._due[0][0] - now if self._due else None)


_WATCHDOG = _Watchdog()
_current = threading.local()  # .watch: the call in progress on this thread, if any


def _attach_to_current_call(sock: socket.socket | None) -> None:
    watch: _Watch | None = getattr(_current, "watch", None)
    if watch is not None:
        watch.attach(sock)


class _Watched:
    """Hands every socket a connection uses to the watch of the call in progress on this thread."""

    sock: Any

    def _new_conn(self) -> socket.socket:  # a new connection (for https: its plain socket, before TLS)
        sock = super()._new_conn()  # type: ignore[misc]
        _attach_to_current_call(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # a kept-alive connection: the socket it goes out on
        _attach_to_current_call(self.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self) -> Any:  # every request, new or kept-alive connection: the socket the answer comes on
        _attach_to_current_call(self.sock)
        return super().getresponse()  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # An HTTP(S) proxy uses the standard pools; a SOCKS proxy has its own, which we leave alone.
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


class _NoRedirectSession(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> None:
        # No target: requests neither reads the redirect's body nor prepares a next hop.
        return None


def new_session(base_url: str) -> requests.Session:
    """A keep-alive session whose calls can be bounded by send_within(). Not thread-safe: one per thread."""
    session = _NoRedirectSession()
    session.mount("https://", _WatchedAdapter())
    session.mount("http://", _WatchedAdapter())
    # requests re-reads the proxy environment on every call (~0.35 ms each); read it
    # once per session instead: the environment of a running daemon does not change.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(base_url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    # The cap counts bytes as read from the wire; a compressed answer would decode to more.
    session.headers["Accept-Encoding"] = "identity"
    return session


def send_within(
    session: requests.Session,
    method: str,
    *,
    deadline: float,
    timeout: tuple[float, float],
    max_bytes: int,
    on_headers: Callable[[requests.Response], None],
    **kwargs: Any,
) -> requests.Response:
    """Send one request on `session`; the complete answer must be in by `deadline` (time.monotonic()).

    Returns the response with its body already read (`.content`, `.text`
    work; the connection is back in the pool). Raises requests.Timeout when
    the deadline struck first, AnswerTooLarge over `max_bytes`, and
    requests' own exceptions for everything else. `on_headers` sees the
    response as soon as its status and headers are in.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise CallNotSent("DEADLINE", "no time left to send")
    connect_timeout, read_timeout = timeout
    watch = _WATCHDOG.watch(deadline)
    _current.watch = watch
    try:
        response = session.request(
            method,
            stream=True,
            allow_redirects=False,
            timeout=(min(connect_timeout, left), min(read_timeout, left)),
            **kwargs,
        )
        try:
            on_headers(response)
            _read_capped(response, watch, max_bytes)
        except BaseException:
            response.close()  # unread bytes are left: the connection cannot be reused
            raise
    except Exception as exc:
        if watch.disarm():
            raise _past_deadline() from exc
        raise
    finally:
        _current.watch = None
        watch.disarm()  # idempotent; also when interrupted (KeyboardInterrupt)
    if watch.fired:
        # The answer may be complete, but not provably before the deadline.
        raise _past_deadline()
    return response


def _past_deadline() -> requests.ReadTimeout:
    return requests.ReadTimeout("the answer was not complete by the call's deadline")


def _read_capped(response: requests.Response, watch: _Watch, max_bytes: int) -> None:
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise AnswerTooLarge(f"the answer declares {int(declared)} bytes, over the {max_bytes}-byte cap")
    body = bytearray()
    while True:
        watch.cut_socket_timeout()
        chunk = _read_chunk(response)
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise AnswerTooLarge(f"the answer is over the {max_bytes}-byte cap")
        if watch.time_left() <= 0:
            raise _past_deadline()
    # What requests itself does once a body is read, so .content and .text (which the SDK verifies) work.
    response._content = bytes(body)
    response._content_consumed = True  # type: ignore[attr-defined]  # requests' own private flag, absent from its stubs


def _read_chunk(response: requests.Response) -> bytes:
    # urllib3's exceptions, turned into the requests ones that gateway.classify knows (as iter_content does).
    try:
        return response.raw.read(ANSWER_CHUNK_BYTES, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.ReadTimeout(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except (urllib3.exceptions.ProtocolError, OSError) as exc:
        raise requests.ConnectionError(exc) from exc
