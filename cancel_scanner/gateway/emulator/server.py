"""The emulator's HTTP server: a threading, keep-alive HTTP/1.1 server on a loopback port.

It reads each request's body and hands the exchange to a callback
(Emulator._exchange), which answers through the handler's write_reply or drop.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loguru import logger

MAX_BODY_BYTES = 64 * 1024

_log = logger.bind(component="emulator")

# (handler, method, body); body None: missing length or over MAX_BODY_BYTES, left unread.
Exchange = Callable[["Handler", str, "bytes | None"], None]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 refuses a burst of new connections (16 worker
    # threads opening theirs at once) with connect timeouts the real gateway never shows.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], exchange: Exchange) -> None:
        self.exchange = exchange
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is business as usual here, not a traceback on stderr.
        _log.opt(exception=True).debug("connection from {} ended with an error", client_address)

    def close(self) -> None:
        """Stop serving (the caller's serve_forever returns), close the port and every open connection."""
        self.shutdown()
        self.server_close()
        # Keep-alive connections would otherwise hold handler threads until the client hangs up.
        with self.sockets_lock:
            lingering = list(self.open_sockets)
        for sock in lingering:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real gateway
    # Headers and body go out in two writes; with Nagle on, the second waits
    # for the client's delayed ACK and every answer takes 40 ms longer.
    disable_nagle_algorithm = True
    server_version = "WeChatPayEmulator"
    sys_version = ""
    server: Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one loguru event per request instead (Emulator._record)

    def _serve(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.server.exchange(self, method, None)
            return
        body = self.rfile.read(length) if length else b""
        self.server.exchange(self, method, body)

    def write_reply(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
