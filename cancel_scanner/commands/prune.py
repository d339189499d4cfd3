"""`cancel-scanner prune --older-than 90d [--dry-run] [--batch-size N] [--max-rows N]`: finished rows into the archives."""

from __future__ import annotations

import re
import signal
import sys
import threading
from datetime import timedelta

import click

from cancel_scanner.commands.common import EXIT_CONFIG, EXIT_FAILURE, CliContext, audited, check_schema, short
from cancel_scanner.i18n import N_, tr

_AGE = re.compile(r"^\s*(\d{1,6})\s*([dhm])\s*$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_age(value: str) -> timedelta:
    """``90d``, ``36h``, ``2880m``: ValueError with the reason otherwise."""
    match = _AGE.match(value or "")
    if match is None:
        raise ValueError(f"{value!r} is not an age: a number and a unit, d (days), h (hours) or m (minutes), as 90d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@click.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Move rows finished before this long ago (database time): 90d, 36h, 2880m; at least 1d.",
)
@click.option("--dry-run", is_flag=True, help="Count per table what would move (the same bounded scan); move nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=None,
    metavar="N",
    help="Rows per transaction (default: prune.batch_size, 500).",
)
@click.option(
    "--max-rows",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Stop a table after this many rows (default 1,000,000); run again for the rest.",
)
@click.pass_obj
@audited("prune")
def command(obj: CliContext, older_than: str, dry_run: bool, batch_size: int | None, max_rows: int | None) -> None:
    """Move finished rows older than AGE from req_order_ops, refund_order and goods_order2_oplog into
    their _archive tables, a batch per transaction; goods_order2 is never touched.

    Finished: accepted requests (rejected ones stay); refunds done at every stage, unleased, with no
    other refund of their order still open or CLOSED; oplog events of orders with no such refund
    left. Ctrl-C stops after the batch in hand; a second Ctrl-C at once (the batch rolls back).
    Safe to stop or crash anywhere and run again. Exit 0 done, 2 bad arguments, 1 failure.
    """
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.operations import prune as pruning

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        click.echo(f"cancel-scanner: --older-than: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if age < pruning.MIN_AGE:
        click.echo(
            f"cancel-scanner: --older-than: {older_than.strip()} is under 1 day: the last day's finished rows are the"
            " daemon's, status's and the daily reconciliation's; give 1d or more",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    cfg = obj.config()
    check_schema(cfg, tolerate_outage=False)
    size = batch_size or cfg.prune.batch_size
    limit = max_rows or pruning.DEFAULT_MAX_ROWS
    stop = threading.Event()

    def on_sigint(_signum, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("stopping after the batch in hand (Ctrl-C again: now, rolling it back)", err=True)

    def say(result: pruning.TableResult) -> None:
        verb = "would move" if dry_run else "moved"
        line = (
            f"{result.table:20} {verb} {result.moved:>10,} rows in {result.batches:,} batches, {result.seconds:.1f} s"
        )
        extras = [result.ended] if result.ended != pruning.NOTHING_LEFT else []
        if result.put_off:
            extras.append(f"{result.put_off} batch(es) put off on a lock")
        if result.left_locked:
            extras.append(f"{result.left_locked} row(s) locked by others, left for the next run")
        click.echo(line + (f" ({'; '.join(extras)})" if extras else ""))

    db = engine_for(cfg)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        cutoff = pruning.cutoff_for(db, age)
        click.echo(
            f"prune{' --dry-run' if dry_run else ''}: rows finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
            f" (database time - {older_than.strip()}), batches of {size:,}, at most {limit:,} rows per table"
            + ("; nothing is moved" if dry_run else "")
        )
        report = pruning.prune(
            db, older_than=age, batch_size=size, max_rows=limit, dry_run=dry_run, should_stop=stop.is_set, on_table=say
        )
    except KeyboardInterrupt:
        click.echo("cancel-scanner: prune interrupted: the batch in hand rolled back; run again for the rest", err=True)
        sys.exit(EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        click.echo(f"cancel-scanner: prune failed: {type(exc).__name__}: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        signal.signal(signal.SIGINT, previous)
        db.dispose()
    t = tr(cfg.locale)
    total = t(N_("would move {n} rows") if dry_run else N_("moved {n} rows")).format(n=f"{report.moved:,}")
    stopped = t(N_("; stopped before the end: run again for the rest")) if report.stopped else ""
    if not dry_run:
        obj.changed(
            f"moved {report.moved} row(s) into the archives" + (" (stopped before the end)" if report.stopped else "")
        )
    click.echo(f"prune: {total}{stopped}")
