"""`cancel-scanner status`: per stage, what is pending, failed, and who runs it."""

from __future__ import annotations

import sys

import click

from cancel_scanner.commands.common import EXIT_CONFIG, EXIT_FAILURE, CliContext, check_schema, short


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--totals",
    is_flag=True,
    help="Also count every finished row in the tables (reads whole indexes: slow on large tables).",
)
@click.pass_obj
def command(obj: CliContext, as_json: bool, totals: bool) -> None:
    """Per stage: pending, waiting to retry, failed, oldest pending age, up or down on the running
    daemons, and the rows they finished since they started."""
    import json

    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.status import collect_status, format_status
    from cancel_scanner.scanners import build_stages

    cfg = obj.config()
    check_schema(cfg, tolerate_outage=False)
    db = engine_for(cfg)
    try:
        report = collect_status(
            db, build_stages(cfg), DbClock(db)(), totals=totals, takeover_seconds=cfg.takeover_seconds
        )
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        from cancel_scanner.engine.errors import describe_db_error, is_schema_db_error

        if is_schema_db_error(exc):  # a column missing is not an outage: say what fixes it
            click.echo(f"cancel-scanner: database_url: {describe_db_error(exc)}", err=True)
            sys.exit(EXIT_CONFIG)
        click.echo(f"cancel-scanner: database unavailable: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_status(report, cfg.locale))
