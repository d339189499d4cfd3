"""`cancel-scanner history ORDER`: what happened to one order, in time order (operations/history.py)."""

from __future__ import annotations

import json
import sys

import click

from cancel_scanner.commands.common import EXIT_CONFIG, CliContext, database, short
from cancel_scanner.i18n import N_, local_time, tr


@click.command("history")
@click.argument("order")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
@click.pass_obj
def command(obj: CliContext, order: str, as_json: bool) -> None:
    """The story of ORDER (an order id, its order_no, or an out_refund_no): cancel requests and their
    answers, the order's events, each refund, the operator actions that named it, and what is pending."""
    from cancel_scanner.operations.history import as_dict, story

    cfg = obj.config()
    t = tr(cfg.locale)
    with database(cfg, lambda exc: f"history failed: {short(exc)}") as db:
        told = story(db, order)
    if told is None:
        click.echo(t(N_("no order, order_no or out_refund_no {ref}")).format(ref=order), err=True)
        sys.exit(EXIT_CONFIG)
    if as_json:
        click.echo(json.dumps(as_dict(told), ensure_ascii=False, indent=2))
        return
    o = told.order
    click.echo(
        t(N_("order {id} ({order_no}): {status}, refund {refund}, {cancelled} of {quantity} unit(s) cancelled")).format(
            id=o["id"],
            order_no=o["order_no"],
            status=o["order_status"],
            refund=o["refund_status"],
            cancelled=o.get("cancelled_quantity", 0),
            quantity=o["quantity"],
        )
    )
    for event in told.events:
        click.echo(
            f"  {local_time(event.at, cfg.display_timezone) if event.at else '-':30} {event.kind:8} {event.text}"
        )
    click.echo(t(N_("pending now:")) + (" " + "; ".join(told.pending) if told.pending else " " + t(N_("nothing"))))
