"""`cancel-scanner run`: the daemon, or `--once` for cron."""

from __future__ import annotations

import os
import sys

import click

from cancel_scanner.commands.common import EXIT_FAILURE, EXIT_OK, CliContext, check_schema, fail_config, short
from cancel_scanner.engine.config import ConfigError


@click.command("run")
@click.option("--once", is_flag=True, help="Run the stages until no row is ready, then exit 0.")
@click.pass_obj
def command(obj: CliContext, once: bool) -> None:
    """The daemon: every enabled stage on its interval until SIGTERM/SIGINT."""
    from contextlib import ExitStack

    from cancel_scanner.app import build_app, schedule_daily, serve_monitoring, serve_notifications

    cfg = obj.config()
    with ExitStack() as stack:
        try:
            app = build_app(cfg, stack)  # every configuration error first, then the schema
        except ConfigError as err:
            fail_config(err)
        check_schema(cfg, tolerate_outage=not once)
        if once:
            from cancel_scanner.engine.clock import ClockWatch, DbClock

            if isinstance(app.runner.clock, DbClock):
                ClockWatch(app.runner.clock.offset_seconds).check()  # says so if this host's clock is off
            try:
                totals = app.runner.run_until_idle()
                app.runner.release_leases()  # and leave the process registry
            except Exception as exc:  # noqa: BLE001 - cron wants one line and a non-zero code
                click.echo(f"cancel-scanner: run --once stopped: {short(exc)}", err=True)
                sys.exit(EXIT_FAILURE)
            for name, report in totals.items():
                click.echo(
                    f"{name:16} done {report.done:6}  failed {report.failed:5}  retrying {report.retried:5}  waiting {report.later:5}"
                )
            return
        from cancel_scanner.engine.daemon import Daemon

        daemon = Daemon(app)
        daemon.install_signal_handlers()
        try:
            serve_notifications(app, daemon, stack)
            serve_monitoring(app, daemon, stack)
            schedule_daily(app, daemon)
            daemon.start()
            daemon.wait()
        finally:
            clean = daemon.shutdown()  # also when starting failed: the heartbeat thread must stop
        if not clean:
            # Calls still in flight would hold the interpreter's exit; their leases stay and
            # expire, and every stage is idempotent, so leaving now is safe and keeps the bound.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_OK)
