"""The contract's Prometheus metrics.

Counters come from the process (rows per stage and outcome, WeChat requests per endpoint and
outcome, batch durations, alert messages); gauges that need the database are set from the
watcher's snapshot (see watch.py), so a scrape never touches the database. No order id or refund
number is ever a label.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

import cancel_scanner.gateway.contract as gw

_OUTCOMES = (
    ((gw.Accepted, gw.PaymentState, gw.CloseSent, gw.NoSuchTrade, gw.BillReady), "ok"),
    ((gw.UnknownOutcome,), "unknown"),
    ((gw.RetryLater,), "retry_later"),
    ((gw.Permanent,), "permanent"),
    ((gw.ConfigError,), "config_error"),
)


ENDPOINTS = (
    "apply",
    "query",
    "pay_query",
    "pay_close",
    "abnormal",
    "trade_bill",
    "download_bill",
)  # the gateway's actions


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
        self.rows = Counter(
            "cancel_scanner_rows",
            "Rows finished or rescheduled, by stage and outcome",
            ["stage", "outcome"],
            registry=r,
        )
        self.requests = Counter(
            "cancel_scanner_wechat_requests",
            "WeChat Pay answers by endpoint and classified outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.batch = Histogram(
            "cancel_scanner_batch_seconds",
            "One batch of a stage, claim to commit",
            ["stage"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.up = Gauge(
            "cancel_scanner_stage_up", "1 while the stage runs, 0 while it backs off", ["stage"], registry=r
        )
        self.pending = Gauge("cancel_scanner_pending_rows", "Rows the stage will still act on", ["stage"], registry=r)
        self.oldest = Gauge(
            "cancel_scanner_oldest_pending_seconds", "Age of the oldest pending row", ["stage"], registry=r
        )
        self.leases = Gauge("cancel_scanner_leases_held", "Rows this process holds a gateway lease on", registry=r)
        self.offset = Gauge("cancel_scanner_clock_offset_seconds", "This host's clock minus the database's", registry=r)
        self.refreshed = Gauge(
            "cancel_scanner_gauges_refreshed_timestamp_seconds", "When the database gauges were last read", registry=r
        )
        self.failed = Gauge(
            "cancel_scanner_failed_rows",
            "Rows failed for good (X_scanned=1, X_success=0): a person must look",
            ["stage"],
            registry=r,
        )
        self.abnormal = Gauge(
            "cancel_scanner_abnormal_refunds",
            "Refunds WeChat Pay reports ABNORMAL, waiting for the merchant",
            registry=r,
        )
        self.ship_due = Gauge(
            "cancel_scanner_orders_ship_due",
            "PAID orders not shipped, within jobs.intake.ship_warn_hours of their ship timeout or past it"
            " (0 when the ship timeout is off)",
            registry=r,
        )
        self.facts = Gauge(
            "cancel_scanner_channel_facts_open",
            "What the payment channel did (a close, a refund) for rows whose write-back here failed,"
            " not recorded here yet (channel_fact)",
            registry=r,
        )
        self.firing = Gauge(
            "cancel_scanner_alerts_firing", "Subjects of the rule firing in this process", ["rule"], registry=r
        )
        self.alert_messages = Counter(
            "cancel_scanner_alert_messages", "Alert messages by what became of them", ["outcome"], registry=r
        )
        self.reconcile_diffs = Gauge(
            "cancel_scanner_reconcile_diffs",
            "Differences the latest reconciliation found with WeChat Pay's bill",
            registry=r,
        )
        self.reconcile_failed = Gauge(
            "cancel_scanner_reconcile_failed", "1 while the latest reconciliation failed", registry=r
        )
        self.reconcile_enabled = Gauge(
            "cancel_scanner_reconcile_enabled", "1 when this daemon runs the daily reconciliation", registry=r
        )
        self.reconcile_day = Gauge(
            "cancel_scanner_reconcile_day_timestamp_seconds",
            "Beijing midnight starting the latest reconciled bill day",
            registry=r,
        )
        for outcome in ("sent", "failed", "dropped"):
            self.alert_messages.labels(outcome)
        # Every series exists from the start at 0, so that Prometheus' increase() sees the first one.
        for endpoint in ENDPOINTS:
            for _kinds, outcome in _OUTCOMES:
                self.requests.labels(endpoint, outcome)
        ProcessCollector(registry=r)

    # -- what the engine and the gateway report ------------------------------------------------------

    def batch_done(self, report: Any, seconds: float) -> None:
        for outcome, n in (
            ("done", report.done),
            ("failed", report.failed),
            ("retry", report.retried),
            ("later", report.later),
        ):
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

    def snapshot_read(self, snapshot: Any) -> None:
        """The database gauges from one watcher snapshot."""
        for s in snapshot.status.stages:
            self.pending.labels(s.stage).set(s.pending)
            self.oldest.labels(s.stage).set(s.oldest_pending_seconds or 0)
            self.failed.labels(s.stage).set(s.failed)
        self.abnormal.set(snapshot.status.abnormal_refunds)
        self.ship_due.set(snapshot.status.count("ship_due"))
        self.facts.set(snapshot.status.channel_facts_open)
        last = snapshot.status.reconcile
        if last is not None:
            from datetime import datetime, timedelta, timezone

            self.reconcile_diffs.set(last["diffs"] if last["state"] == "DIFFERS" else 0)
            self.reconcile_failed.set(1 if last["state"] == "FAILED" else 0)
            midnight = datetime.fromisoformat(last["bill_date"]).replace(tzinfo=timezone(timedelta(hours=8)))
            self.reconcile_day.set(midnight.timestamp())
        self.leases.set(snapshot.leases_held)
        self.refreshed.set(time.time())

    def alerts_firing(self, rules: Any, firing: list[tuple[str, str]]) -> None:
        for rule in rules:
            self.firing.labels(rule).set(sum(1 for r, _subject in firing if r == rule))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
