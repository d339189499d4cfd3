"""`cancel-scanner requeue STAGE ROW_ID...`: another go for rows that failed for good."""

from __future__ import annotations

import sys

import click

from cancel_scanner.commands.common import EXIT_FAILURE, CliContext, by_option, short
from cancel_scanner.scanners import REGISTRY


@click.command("requeue")
@click.argument("stage", type=click.Choice(list(REGISTRY.names)))
@click.argument("row_ids", nargs=-1, required=True, type=int)
@by_option("in last_error")
@click.pass_obj
def command(obj: CliContext, stage: str, row_ids: tuple[int, ...], who: str) -> None:
    """Give rows of STAGE that failed for good (X_scanned=1, X_success=0) another go."""
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.requeue import requeue as requeue_rows
    from cancel_scanner.scanners import build_stages

    cfg = obj.config()
    db = engine_for(cfg)
    try:
        count = requeue_rows(db, build_stages(cfg)[stage], row_ids, DbClock(db)(), who)
    except Exception as exc:  # noqa: BLE001
        click.echo(f"cancel-scanner: requeue failed: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    click.echo(f"{stage}: {count} of {len(set(row_ids))} row(s) requeued (only rows that had failed for good are)")
