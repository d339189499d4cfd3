"""`cancel-scanner requeue STAGE ROW_ID...`: another go for rows that failed for good."""

from __future__ import annotations

import click

from cancel_scanner.commands.common import CliContext, audited, by_option, database, short
from cancel_scanner.i18n import N_, tr
from cancel_scanner.scanners import REGISTRY


@click.command("requeue")
@click.argument("stage", type=click.Choice(list(REGISTRY.names)))
@click.argument("row_ids", nargs=-1, required=True, type=int)
@by_option("in last_error")
@click.pass_obj
@audited("requeue")
def command(obj: CliContext, stage: str, row_ids: tuple[int, ...], who: str) -> None:
    """Give rows of STAGE that failed for good (X_scanned=1, X_success=0) another go."""
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.requeue import requeue as requeue_rows
    from cancel_scanner.scanners import build_stages

    cfg = obj.config()
    with database(cfg, lambda exc: f"requeue failed: {short(exc)}") as db:
        count = requeue_rows(db, build_stages(cfg)[stage], row_ids, DbClock(db)(), who)
    said = tr(cfg.locale)(N_("{stage}: {count} of {asked} row(s) requeued (only rows that had failed for good are)"))
    obj.changed(f"{stage}: {count} row(s) requeued")
    click.echo(said.format(stage=stage, count=count, asked=len(set(row_ids))))
