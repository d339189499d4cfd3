"""`cancel-scanner reconcile --date YYYY-MM-DD`: one day of WeChat Pay's bill against the tables."""

from __future__ import annotations

import sys
from datetime import date, datetime, timedelta

import click

from cancel_scanner.commands.common import (
    EXIT_CONFIG,
    EXIT_DIFFERS,
    EXIT_FAILURE,
    EXIT_NOT_READY,
    CliContext,
    audited,
    check_schema,
    short,
)
from cancel_scanner.i18n import N_, tr


def yesterday_in_beijing() -> date:
    from cancel_scanner.operations.reconcile import BEIJING

    return (datetime.now(BEIJING) - timedelta(days=1)).date()


@click.command("reconcile")
@click.option(
    "--date",
    "day",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The bill's day (Beijing time). Default: yesterday.",
)
@click.option(
    "--refund-orphans/--report-orphans",
    default=None,
    help="Refund payments for orders cancelled without a refund (default: reconcile.refund_orphan_payments).",
)
@click.pass_obj
@audited("reconcile")
def command(obj: CliContext, day: datetime | None, refund_orphans: bool | None) -> None:
    """Download WeChat Pay's ALL bill of a day, check its SHA1, and compare it with the tables: refunds
    WeChat has that we do not, ours it does not list (the days either side searched too), amounts
    or final states that differ, and payments for orders cancelled here without a refund.

    The differences replace the day's earlier ones in reconcile_diff; reconcile_run says how the day
    ended. Exit 0 clean (or no bill: no trades that day), 4 differences found, 75 the bill is not
    ready yet (try again later), 1 failure (a bad hash, the gateway), 2 configuration.
    """
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.config import ConfigError
    from cancel_scanner.engine.db import engine_for

    cfg = obj.config()
    if cfg.wechat.mode != "live":
        click.echo(
            "cancel-scanner: reconcile: wechat.mode is sandbox: the sandbox's WeChat lives inside the daemon,"
            " whose daily job reconciles it (reconcile.enabled); this command needs wechat.mode live",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    check_schema(cfg, tolerate_outage=False)
    from contextlib import ExitStack

    from cancel_scanner.gateway.wechat_channel import build_gateway
    from cancel_scanner.operations.bill import fetch_bill
    from cancel_scanner.operations.reconcile import reconcile_day

    bill_date = day.date() if day else yesterday_in_beijing()
    orphans = cfg.reconcile.refund_orphan_payments if refund_orphans is None else refund_orphans
    db = engine_for(cfg)
    try:
        with ExitStack() as stack:
            try:
                gateway = build_gateway(cfg, stack)
            except ConfigError as err:
                click.echo(f"cancel-scanner: configuration error: {err}", err=True)
                sys.exit(EXIT_CONFIG)
            result = reconcile_day(
                db, lambda d: fetch_bill(gateway, d), bill_date, now=DbClock(db)(), refund_orphans=orphans
            )
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        click.echo(f"cancel-scanner: reconcile failed: {type(exc).__name__}: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    if result.state == "WAITING":
        click.echo(f"{bill_date}: the bill is not ready yet ({result.message}); try again later", err=True)
        sys.exit(EXIT_NOT_READY)
    if result.state == "FAILED":
        click.echo(f"{bill_date}: reconciliation failed: {result.message}", err=True)
        sys.exit(EXIT_FAILURE)
    t = tr(cfg.locale)
    said = t(N_("{day}: {state}, {rows} bill row(s), {diffs} difference(s)"))
    obj.changed(
        f"{bill_date}: {result.state}, {len(result.diffs)} difference(s)"
        + (f", refunds opened for {len(result.refunded_orphans)} orphan payment(s)" if result.refunded_orphans else "")
    )
    click.echo(said.format(day=bill_date, state=result.state, rows=result.bill_rows, diffs=len(result.diffs)))
    for kind, n in sorted(result.counts.items()):
        click.echo(f"  {kind}: {n}")
    for number in result.refunded_orphans:
        click.echo("  " + t(N_("refund opened for the orphan payment of {number}")).format(number=number))
    if result.diffs:
        click.echo(f"  SELECT * FROM reconcile_diff WHERE bill_date = '{bill_date}'")
        sys.exit(EXIT_DIFFERS)
