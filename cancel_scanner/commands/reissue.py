"""`cancel-scanner reissue ORDER_ID...`: a new refund for each order whose last refund WeChat closed."""

from __future__ import annotations

import sys

import click

from cancel_scanner.commands.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ROW_ID,
    CliContext,
    audited,
    by_option,
    check_schema,
    short,
)
from cancel_scanner.i18n import N_, render, tr


@click.command("reissue")
@click.argument("order_ids", nargs=-1, required=True, type=ROW_ID)
@by_option("in the oplog and on the closed refund")
@click.option(
    "--reason", "why", default="WeChat Pay closed the refund", show_default=True, help="Why (kept in the oplog)."
)
@click.pass_obj
@audited("reissue")
def command(obj: CliContext, order_ids: tuple[int, ...], who: str, why: str) -> None:
    """After WeChat Pay CLOSED an order's refund: a new refund with the next refund_seq and its own
    out_refund_no, the order back to REFUNDING; the daemon sends and follows it.

    Refused (one line per order, exit 2) unless every refund of the order is CLOSED and written back
    to the order. Exit 0 when every order was reissued.
    """
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.operations.reissue import Refused, reissue

    cfg = obj.config()
    check_schema(cfg, tolerate_outage=False)
    db = engine_for(cfg)
    refused, t = 0, tr(cfg.locale)
    try:
        for order_id in dict.fromkeys(order_ids):  # each once, in the order given
            result = reissue(db, order_id, now=DbClock(db)(), by=who, why=why)
            if isinstance(result, Refused):
                refused += 1
                said = t(N_("order {order}: refused {code}: {message}"))
                click.echo(
                    said.format(order=order_id, code=result.code, message=render(result.message, cfg.locale)), err=True
                )
            else:
                obj.changed(f"order {order_id}: {result.out_refund_no} replaces {result.replaces}")
                said = t(N_("order {order}: reissued as {number} (refund row {row}, replaces {replaces})"))
                click.echo(
                    said.format(
                        order=order_id, number=result.out_refund_no, row=result.refund_id, replaces=result.replaces
                    )
                )
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        click.echo(f"cancel-scanner: reissue failed: {type(exc).__name__}: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    if refused:
        sys.exit(EXIT_CONFIG)
