"""Operator commands. Thin: parse, call, print, exit code.

Exit codes: 0 success, 2 bad usage or configuration (one line naming the key), 3 `migrate --check`: the schema is behind, 1 anything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cancel_scanner import __version__
from cancel_scanner.engine.config import Config, ConfigError, load_config, resolve_config_path
from cancel_scanner.scanners import REGISTRY

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_BEHIND = 0, 1, 2, 3


def _fail_config(err: ConfigError) -> None:
    click.echo(f"cancel-scanner: configuration error: {err}", err=True)
    sys.exit(EXIT_CONFIG)


class _Ctx:
    def __init__(self, config_path: str | None, log_json: bool | None, log_level: str | None):
        self.config_path = config_path
        self.log_json = log_json
        self.log_level = log_level
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(resolve_config_path(self.config_path), REGISTRY)
            except ConfigError as err:
                _fail_config(err)
            self.setup_logging()
        return self._config

    def setup_logging(self) -> None:
        from cancel_scanner.engine.logs import setup_logging

        cfg = self._config
        json_lines = self.log_json if self.log_json is not None else (cfg.log_json if cfg else False)
        level = self.log_level or (cfg.log_level if cfg else "INFO")
        setup_logging(json_lines=json_lines, level=level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="cancel-scanner")
@click.option("--config", "config_path", metavar="PATH", help="jobs.yaml to use (default: $CANCEL_SCANNER_CONFIG, then ./jobs.yaml).")
@click.option("--log-json/--no-log-json", default=None, help="One JSON object per log line.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default=None)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_json: bool | None, log_level: str | None) -> None:
    """cancel-scanner: merchants' cancel requests to WeChat Pay refunds, stock and sales, exactly once."""
    ctx.obj = _Ctx(config_path, log_json, log_level.upper() if log_level else None)


@main.command()
@click.pass_obj
def initdb(obj: _Ctx) -> None:
    """Create the schema on a new database (MySQL: sql/schema.sql). Safe to run twice.

    A database that already has tables of its own (a shop's goods_order2, an older
    cancel-scanner) is `cancel-scanner migrate`'s: initdb says so and changes nothing.
    """
    from cancel_scanner.app import schema_problem
    from cancel_scanner.engine.db import engine_for, init_schema

    cfg = obj.config()
    engine = engine_for(cfg)
    try:
        problem = schema_problem(engine)
        if problem is not None and problem.kind != "empty":
            click.echo(f"cancel-scanner: initdb: this database has tables already, {problem}", err=True)
            sys.exit(EXIT_CONFIG)
        tables = init_schema(engine)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the operator needs one readable line, not a traceback
        click.echo(f"cancel-scanner: initdb failed: {type(exc).__name__}: {_short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()
    click.echo(f"schema ready on {engine.url.render_as_string(hide_password=True)}: {', '.join(tables)}")


@main.command()
@click.option("--sql", "show_sql", is_flag=True, help="Print the statements (with what each locks) and change nothing.")
@click.option("--check", is_flag=True, help="Change nothing; exit 3 when the database is behind, 0 when it is at head.")
@click.pass_obj
def migrate(obj: _Ctx, show_sql: bool, check: bool) -> None:
    """Bring the database to this cancel-scanner's schema: add what is missing, never drop.

    Adopts a shop's existing goods and goods_order2 (adds the scanner's columns with their
    defaults, and its indexes, online), upgrades an older cancel-scanner's, refuses a column
    whose type cannot hold what the scanner writes. Safe to run twice.
    """
    from cancel_scanner.app import migration_plan
    from cancel_scanner.engine import migrate as schema
    from cancel_scanner.engine.db import engine_for

    cfg = obj.config()
    engine = engine_for(cfg)
    try:
        if show_sql or check:
            plan = migration_plan(engine)
            if show_sql:
                click.echo("\n".join(schema.render(plan)))
            if check:
                state = "behind" if plan.behind else "at head"
                click.echo(f"schema version {plan.current if plan.current is not None else 'none'}, head {plan.head}: {state}", err=show_sql)
                sys.exit(EXIT_BEHIND if plan.behind else EXIT_OK)
            return
        with schema.exclusive(engine, say=click.echo):  # planned under the lock: a second migrate finds nothing to do
            plan = migration_plan(engine)
            if not plan.behind:
                click.echo(f"schema at version {plan.head}: nothing to do")
                return
            for note in plan.notes:
                click.echo(f"note: {note}")
            schema.apply(engine, plan, say=click.echo)
    except schema.SchemaRefused as exc:
        click.echo(f"cancel-scanner: migrate refused: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except Exception as exc:  # noqa: BLE001
        click.echo(f"cancel-scanner: migrate failed: {type(exc).__name__}: {_short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()
    click.echo(f"schema at version {plan.head}")


def _check_schema(cfg: Config, *, tolerate_outage: bool) -> None:
    """Exit 2 with one line when the database's schema is not this code's (behind, ahead, none).

    A database that is down is the daemon's to wait for (``tolerate_outage``); `run --once` and
    `status` say so and exit 1.
    """
    from cancel_scanner.app import schema_problem
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.errors import is_transient_db_error

    db = engine_for(cfg)
    try:
        problem = schema_problem(db)
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        if tolerate_outage and is_transient_db_error(exc):
            return
        click.echo(f"cancel-scanner: database unavailable: {_short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    if problem:
        click.echo(f"cancel-scanner: database_url: {problem}", err=True)
        sys.exit(EXIT_CONFIG)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else ""


@main.command()
@click.option("--once", is_flag=True, help="Run the stages until no row is ready, then exit 0.")
@click.pass_obj
def run(obj: _Ctx, once: bool) -> None:
    """The daemon: every enabled stage on its interval until SIGTERM/SIGINT."""
    from contextlib import ExitStack

    from cancel_scanner.app import build_app, schedule_daily, serve_monitoring, serve_notifications

    cfg = obj.config()
    with ExitStack() as stack:
        try:
            app = build_app(cfg, stack)  # every configuration error first, then the schema
        except ConfigError as err:
            _fail_config(err)
        _check_schema(cfg, tolerate_outage=not once)
        if once:
            from cancel_scanner.engine.clock import ClockWatch

            ClockWatch(app.runner.clock.offset_seconds).check()  # says so if this host's clock is off
            try:
                totals = app.runner.run_until_idle()
                app.runner.release_leases()  # and leave the process registry
            except Exception as exc:  # noqa: BLE001 - cron wants one line and a non-zero code
                click.echo(f"cancel-scanner: run --once stopped: {_short(exc)}", err=True)
                sys.exit(EXIT_FAILURE)
            for name, report in totals.items():
                click.echo(f"{name:16} done {report.done:6}  failed {report.failed:5}  retrying {report.retried:5}  waiting {report.later:5}")
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--totals", is_flag=True, help="Also count every finished row in the tables (reads whole indexes: slow on large tables).")
@click.pass_obj
def status(obj: _Ctx, as_json: bool, totals: bool) -> None:
    """Per stage: pending, waiting to retry, failed, oldest pending age, up or down on the running
    daemons, and the rows they finished since they started."""
    import json

    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.status import collect_status, format_status
    from cancel_scanner.scanners import build_stages

    cfg = obj.config()
    _check_schema(cfg, tolerate_outage=False)
    db = engine_for(cfg)
    try:
        report = collect_status(db, build_stages(cfg), DbClock(db)(), totals=totals, takeover_seconds=cfg.takeover_seconds)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        from cancel_scanner.engine.errors import describe_db_error, is_schema_db_error

        if is_schema_db_error(exc):  # a column missing is not an outage: say what fixes it
            click.echo(f"cancel-scanner: database_url: {describe_db_error(exc)}", err=True)
            sys.exit(EXIT_CONFIG)
        click.echo(f"cancel-scanner: database unavailable: {_short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_status(report))


@main.command()
@click.argument("stage", type=click.Choice(list(REGISTRY.names)))
@click.argument("row_ids", nargs=-1, required=True, type=int)
@click.option("--by", "who", default=lambda: os.environ.get("USER", "operator"), help="Who requeues (kept in last_error).")
@click.pass_obj
def requeue(obj: _Ctx, stage: str, row_ids: tuple[int, ...], who: str) -> None:
    """Give rows of STAGE that failed for good (X_scanned=1, X_success=0) another go."""
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.requeue import requeue as requeue_rows
    from cancel_scanner.scanners import build_stages

    cfg = obj.config()
    db = engine_for(cfg)
    try:
        count = requeue_rows(db, build_stages(cfg)[stage], row_ids, DbClock(db)(), who)
    except Exception as exc:  # noqa: BLE001
        click.echo(f"cancel-scanner: requeue failed: {_short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    click.echo(f"{stage}: {count} of {len(set(row_ids))} row(s) requeued (only rows that had failed for good are)")


@main.command()
@click.option(
    "--db",
    "db_path",
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file to create; it must not exist yet. Default: demo.db in a new temporary directory,"
    " kept afterwards (with demo.log) so you can inspect it.",
)
@click.option("--orders", default=40, show_default=True, type=click.IntRange(12, 500), help="Sample orders to seed.")
@click.option("--seed", type=int, default=None, help="Seed of the sample data (default: a new one each run; the summary names it).")
@click.pass_obj
def demo(obj: _Ctx, db_path: Path | None, orders: int, seed: int | None) -> None:
    """The embedded default: SQLite + sandbox gateway + sample orders, the whole flow.

    Needs no server, no credentials and no jobs.yaml (it does not read one). Logs go
    to a file next to the database; --log-json and --log-level shape that file.
    Exits 0 when everything settled and every check passed.
    """
    from cancel_scanner.demo import DemoError, run_demo

    try:
        ok = run_demo(db_path=db_path, orders=orders, seed=seed, log_json=bool(obj.log_json), log_level=obj.log_level or "INFO")
    except DemoError as err:
        click.echo(f"cancel-scanner: {err}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_OK if ok else EXIT_FAILURE)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--key-dir", type=click.Path(file_okay=False, path_type=Path), help="Where to write generated key material.")
@click.option("--success-delay", default=2.0, show_default=True, type=click.FloatRange(0), help="Seconds from PROCESSING to SUCCESS.")
@click.pass_obj
def emulator(obj: _Ctx, host: str, port: int, key_dir: Path | None, success_delay: float) -> None:
    """Serve the WeChat Pay v3 refund emulator on a loopback port."""
    from cancel_scanner.engine.net import is_loopback_host
    from cancel_scanner.engine.logs import setup_logging

    if not is_loopback_host(host):
        click.echo(f"cancel-scanner: --host: the emulator serves loopback addresses only, got {host!r}", err=True)
        sys.exit(EXIT_CONFIG)
    setup_logging(json_lines=bool(obj.log_json), level=obj.log_level or "INFO")
    from cancel_scanner.gateway.emulator import serve

    sys.exit(serve(host=host, port=port, key_dir=key_dir, success_delay=success_delay))


from cancel_scanner.commands import register  # noqa: E402 - the commands import this module's helpers

register(main)

if __name__ == "__main__":
    main()
