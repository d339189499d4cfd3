"""Wiring: configuration in, a database engine, a gateway, the stages, a runner and servers out.

Sandbox mode starts the emulator in this process and points the very same
WeChat Pay client at it: there is no separate fake code path.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from loguru import logger
from sqlalchemy import Engine

from cancel_scanner.config import Config
from cancel_scanner.engine import migrate
from cancel_scanner.engine.db import engine_for
from cancel_scanner.engine.runner import Hooks, Runner
from cancel_scanner.gateway.channels import DEFAULT_CHANNEL, ChannelRegistry, Channels
from cancel_scanner.gateway.registry import CHANNELS
from cancel_scanner.models import metadata
from cancel_scanner.scanners import build_stages


@dataclass
class App:
    config: Config
    db: Engine
    gateway: Any  # WeChat Pay's client (the notification endpoint, the bill, abnormal refunds read it)
    runner: Runner
    sandbox: Any = None  # the Sandbox in sandbox mode (its emulator, for the demo and tests)
    channels: Channels | None = None  # every payment channel served, the stages' calls routed by the row's channel


def schema_problem(db: Engine) -> migrate.SchemaProblem | None:
    """One line when the database's schema is not the one this code needs (behind, ahead, none)."""
    return migrate.schema_problem(db, metadata.tables)


def migration_plan(db: Engine) -> migrate.Plan:
    """What `cancel-scanner migrate` would run on ``db`` (raises migrate.SchemaRefused)."""
    return migrate.plan(db, metadata=metadata)


def serve_notifications(app: App, daemon: Any, stack: ExitStack) -> Any:
    """With wechat.notify_listen set: a notification brings that refund's next poll forward.

    Returns the started NotifyServer (None when not configured); ``stack`` stops it.
    """
    listen = app.config.wechat.notify_listen
    if not listen:
        return None
    from cancel_scanner.gateway.notify import NotifyServer

    poll: Any = next(stage for stage in app.runner.stages.values() if getattr(stage, "takes_notifications", False))
    host, _, port = listen.rpartition(":")

    def on_refund(resource: dict) -> None:
        now = app.runner.clock()
        with app.db.begin() as conn:
            moved = poll.poll_soon(conn, resource["out_refund_no"], now)
        if moved:
            daemon.wake(poll.name)

    notify = NotifyServer(app.gateway, on_refund, host=host, port=int(port))
    notify.start()
    stack.callback(notify.stop)
    return notify


def schedule_daily(app: App, daemon: Any) -> None:
    """The daily jobs the configuration asks for (reconciliation, pruning), on the daemon's scheduler."""
    from cancel_scanner.operations.daily import jobs

    for job in jobs(app):
        daemon.add_daily(job)


def build_app(
    config: Config, stack: ExitStack, *, hooks: Hooks | None = None, clock=None, channels: ChannelRegistry = CHANNELS
) -> App:
    db = engine_for(config)
    stack.callback(db.dispose)
    routed = channels.build(config, stack)
    gateway = routed.gateways.get(DEFAULT_CHANNEL)
    runner = Runner(db, config, build_stages(config), routed, hooks=hooks, clock=clock)
    stack.callback(runner.close)
    return App(
        config=config, db=db, gateway=gateway, runner=runner, sandbox=getattr(gateway, "sandbox", None), channels=routed
    )


def serve_monitoring(app: App, daemon: Any, stack: ExitStack) -> Any:
    """With monitoring.listen or alerts.webhook_url set: metrics fed by the runner, the gateway and the
    daemon; a watcher reading the database on its own schedule for the gauges, the alert rules and the
    status page; /metrics, /healthz, /readyz and / served when listening. ``stack`` stops them all.
    Returns the MonitoringServer (None when not listening)."""
    listen, alerts = app.config.monitoring.listen, app.config.alerts
    if not listen and not alerts.webhook_url:
        return None
    import time

    from cancel_scanner.alerts.rules import AlertBook, CallWindow
    from cancel_scanner.monitoring.metrics import Metrics, answer_outcome
    from cancel_scanner.monitoring.page import PageView
    from cancel_scanner.monitoring.server import MonitoringServer
    from cancel_scanner.monitoring.watch import Watcher

    metrics = Metrics()
    metrics.reconcile_enabled.set(1 if app.config.reconcile.enabled else 0)
    rules = alerts.rules
    calls = CallWindow(max(rules.gateway_failure_rate.window_seconds, rules.config_error.window_seconds))

    def answered(endpoint: str, result: Any) -> None:
        metrics.answered(endpoint, result)
        label = answer_outcome(result)
        if label is not None:
            calls.record(label)

    app.runner.on_batch = metrics.batch_done
    app.gateway.on_answer = answered
    daemon.on_stage_state = metrics.stage_state
    for name in daemon.stages:  # the stages this daemon runs (enabled in jobs.yaml); the others have no series
        metrics.stage_state(name, True)
    book = None
    if alerts.webhook_url:
        from cancel_scanner.alerts.deliver import Notifier

        notifier = Notifier(
            alerts.webhook_url,
            alerts.format,
            secret=alerts.secret,
            timeout_seconds=alerts.timeout_seconds,
            on_result=lambda outcome: metrics.alert_messages.labels(outcome).inc(),
            locale=app.config.locale,
            timezone=app.config.display_timezone,
        ).start()
        stack.callback(notifier.stop)
        book = AlertBook(rules=rules, cooldown_seconds=alerts.cooldown_seconds, send=notifier.send)
    interval = app.config.monitoring.refresh_seconds
    watcher = Watcher(
        app.db,
        dict(app.runner.stages),
        app.runner,
        interval,
        takeover_seconds=app.config.takeover_seconds,
        metrics=metrics,
        book=book,
        calls=calls,
        down=daemon.progress.down,
        clock_offset=getattr(app.runner.clock, "offset_seconds", None),
        reconcile_expected=app.config.reconcile.enabled,
    ).start()
    stack.callback(watcher.stop)
    if not listen:
        return None

    def page() -> PageView:
        return PageView(
            snapshot=watcher.latest,
            refresh_seconds=interval,
            host=watcher.host,
            now=time.time(),
            last_error=watcher.last_error,
            alerts=book.recent() if book else (),
            firing=tuple(book.firing()) if book else (),
            locale=app.config.locale,
            timezone=app.config.display_timezone,
        )

    host, _, port = listen.rpartition(":")
    server = MonitoringServer(
        metrics,
        host.strip("[]"),
        int(port),
        alive=lambda: daemon.scheduler.running and not daemon.stopped.is_set(),
        db=app.db,
        gateway_ready=lambda: app.gateway is not None,
        page=page,
        token=app.config.monitoring.token,
    ).start()
    if not app.config.monitoring.loopback and app.config.monitoring.token is None:
        logger.bind(stage="monitoring", action="unauthenticated").warning(
            "the status page and /metrics on {} answer anyone who can reach it (monitoring.allow_unauthenticated)",
            listen,
        )
    stack.callback(server.stop)
    return server
