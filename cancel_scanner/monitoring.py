"""Prometheus metrics and health checks, served on `monitoring.listen` (off when absent).

Counters come from the process (rows per stage and outcome, WeChat requests per endpoint and
outcome, batch durations); gauges that need the database (pending rows and the oldest pending
age per stage, leases held, the clock's offset) are refreshed on the daemon's own schedule, every
`monitoring.refresh_seconds`, by queries over pending rows only: their cost follows the backlog,
never the finished rows, and a scrape never touches the database. No order id or refund number
is ever a label.

/healthz: the process and its scheduler are alive. /readyz: the database answers and the
gateway is configured. Both answer in a bounded time; neither needs the database to scrape.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, func, select, text

import cancel_scanner.gateway.contract as gw

REQUEST_TIMEOUT_SECONDS = 5.0  # a scraper that trickles its request is cut off
READY_DB_TIMEOUT_SECONDS = 2.0
_OUTCOMES = (
    ((gw.Accepted, gw.PaymentState, gw.CloseSent), "ok"),
    ((gw.UnknownOutcome,), "unknown"),
    ((gw.RetryLater,), "retry_later"),
    ((gw.Permanent,), "permanent"),
    ((gw.ConfigError,), "config_error"),
)


def answer_outcome(result: Any) -> str | None:
    """The contract's outcome label of one gateway answer; None for a call that was never sent."""
    for kinds, label in _OUTCOMES:
        if isinstance(result, kinds):
            return label
    return None


class Metrics:
    """The contract's metric names in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Counter("cancel_scanner_rows", "Rows finished or rescheduled, by stage and outcome", ["stage", "outcome"], registry=r)
        self.requests = Counter("cancel_scanner_wechat_requests", "WeChat Pay answers by endpoint and classified outcome",
                                ["endpoint", "outcome"], registry=r)
        self.batch = Histogram("cancel_scanner_batch_seconds", "One batch of a stage, claim to commit", ["stage"], registry=r,
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.up = Gauge("cancel_scanner_stage_up", "1 while the stage runs, 0 while it backs off", ["stage"], registry=r)
        self.pending = Gauge("cancel_scanner_pending_rows", "Rows the stage will still act on", ["stage"], registry=r)
        self.oldest = Gauge("cancel_scanner_oldest_pending_seconds", "Age of the oldest pending row", ["stage"], registry=r)
        self.leases = Gauge("cancel_scanner_leases_held", "Rows this process holds a gateway lease on", registry=r)
        self.offset = Gauge("cancel_scanner_clock_offset_seconds", "This host's clock minus the database's", registry=r)
        self.refreshed = Gauge("cancel_scanner_gauges_refreshed_timestamp_seconds", "When the database gauges were last read",
                               registry=r)
        ProcessCollector(registry=r)

    # -- what the engine and the gateway report ------------------------------------------------------

    def batch_done(self, report: Any, seconds: float) -> None:
        for outcome, n in (("done", report.done), ("failed", report.failed), ("retry", report.retried), ("later", report.later)):
            if n:
                self.rows.labels(report.stage, outcome).inc(n)
        if report.claimed or report.error or report.blocked:
            self.batch.labels(report.stage).observe(seconds)

    def answered(self, endpoint: str, result: Any) -> None:
        label = answer_outcome(result)
        if label is not None:
            self.requests.labels(endpoint, label).inc()

    def stage_state(self, stage: str, up: bool) -> None:
        self.up.labels(stage).set(1 if up else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class GaugeRefresher:
    """Reads the database gauges every ``interval`` seconds on a thread of its own."""

    def __init__(self, metrics: Metrics, db: Engine, stages: dict[str, Any], runner: Any, interval: float,
                 clock_offset: Callable[[], float] | None = None) -> None:
        self.metrics, self.db, self.stages, self.runner, self.interval = metrics, db, stages, runner, interval
        self.clock_offset = clock_offset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cs-gauges", daemon=True)

    def start(self) -> GaugeRefresher:
        for name in self.stages:
            self.metrics.stage_state(name, True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def refresh(self) -> None:
        """One reading: per stage, its pending rows and the oldest of them; this process's leases."""
        now = self.runner.clock()
        with self.db.connect() as conn:
            for name, stage in self.stages.items():
                table = stage.flags.table
                count, oldest = conn.execute(
                    select(func.count(), func.min(stage.pending_since)).select_from(table).where(*stage.pending())
                ).one()
                self.metrics.pending.labels(name).set(count)
                self.metrics.oldest.labels(name).set(max(0.0, (now - oldest).total_seconds()) if oldest else 0)
            held = 0
            for owner_col, _ in self.runner.lease_columns():
                held += conn.execute(select(func.count()).select_from(owner_col.table).where(owner_col == self.runner.owner)).scalar_one()
            self.metrics.leases.set(held)
        if self.clock_offset is not None:
            self.metrics.offset.set(self.clock_offset())
        self.metrics.refreshed.set(time.time())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # the database may be down: the gauges keep their last values, and say when
                logger.bind(stage="monitoring", action="refresh_failed").warning("metrics refresh failed: {}", type(exc).__name__)
            self._stop.wait(self.interval)


class MonitoringServer:
    """/metrics, /healthz, /readyz on HOST:PORT; a thread per connection, each bounded in time."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, alive: Callable[[], bool], db: Engine,
                 gateway_ready: Callable[[], bool]) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS

            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = alive()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"scheduler not running\n")
                elif path == "/readyz":
                    problem = server.not_ready()
                    self._send(503 if problem else 200, (problem or "ready") .encode() + b"\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # requests are not worth a log line each
                return

        self.db, self.gateway_ready = db, gateway_ready
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cs-monitoring", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> MonitoringServer:
        self._thread.start()
        logger.bind(stage="monitoring", action="listening", port=self.port).info("metrics and health on port {}", self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def not_ready(self) -> str | None:
        """None when ready; else what is not."""
        if not self.gateway_ready():
            return "gateway not configured"
        result: list[BaseException | None] = []

        def ping() -> None:
            try:
                with self.db.connect() as conn:
                    conn.execute(text("SELECT 1"))
                result.append(None)
            except Exception as exc:  # what readyz reports
                result.append(exc)

        probe = threading.Thread(target=ping, daemon=True)
        probe.start()
        probe.join(READY_DB_TIMEOUT_SECONDS)
        if not result:
            return "database did not answer in time"
        return f"database unavailable: {type(result[0]).__name__}" if result[0] is not None else None
