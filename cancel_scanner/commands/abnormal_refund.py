"""`cancel-scanner abnormal-refund REFUND_ROW_ID --to ...`: send an ABNORMAL refund on to a bank card.

The user's bank details come from a file (``--bank-details-file PATH``, or ``-`` for standard input)
or, on a terminal, from a hidden prompt; never from the command line, where every other user of the
host can read them (ps, shell history). They are never printed, logged or written to the database.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from typing import NoReturn, cast

import click

from cancel_scanner.commands.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ROW_ID,
    CliContext,
    audited,
    by_option,
    check_schema,
    fail_config,
    short,
)
from cancel_scanner.i18n import N_, tr

TO_CHOICES = {"merchant-bank-card": "MERCHANT_BANK_CARD", "user-bank-card": "USER_BANK_CARD"}
DETAILS_FILE_MAX_BYTES = 4096  # two short lines; anything larger is the wrong file


class _BadDetails(Exception):
    """The bank details cannot be read; the message names the problem, never the content."""


def _split_details(raw: bytes, source: str) -> tuple[str, str]:
    """(account number, holder's name) from two lines; each stripped. Trailing blank lines are an editor's, not extra lines."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _BadDetails(f"{source} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise _BadDetails(f"{source} is empty; it must hold two lines: the account number, then the holder's name")
    if len(lines) != 2:
        raise _BadDetails(
            f"{source} has {len(lines)} line(s); it must hold exactly two: the account number, then the holder's name"
        )
    for number, (line, what) in enumerate(zip(lines, ("the account number", "the holder's name")), start=1):
        if not line:
            raise _BadDetails(f"{source}: line {number} ({what}) is empty")
    return lines[0], lines[1]


def _read_details_file(path: str, warn: Callable[[str], None]) -> tuple[str, str]:
    if path == "-":
        raw = sys.stdin.buffer.read(DETAILS_FILE_MAX_BYTES + 1)
        if len(raw) > DETAILS_FILE_MAX_BYTES:
            raise _BadDetails(f"standard input is over {DETAILS_FILE_MAX_BYTES} bytes: not bank details")
        return _split_details(raw, "standard input")
    source = f"--bank-details-file {path}"
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            # A pipe too: `--bank-details-file <(pass show card)` never puts the details on a disk.
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
                raise _BadDetails(f"{source} is not a regular file or a pipe")
            raw = handle.read(DETAILS_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise _BadDetails(f"{source} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > DETAILS_FILE_MAX_BYTES:
        raise _BadDetails(f"{source} is over {DETAILS_FILE_MAX_BYTES} bytes: not a bank details file")
    if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Warned, not refused: the details are already readable by whoever may read the file, and
        # refusing would not take that back; the operator learns to keep the next one private.
        warn(
            f"warning: {path} is readable by other users (mode {stat.filemode(mode)}): keep bank details files"
            " chmod 600, and delete this one when the refund has gone through"
        )
    return _split_details(raw, source)


def _prompt_details() -> tuple[str, str]:
    account = click.prompt("Account number", hide_input=True, confirmation_prompt="Account number again", err=True)
    name = click.prompt("Holder's name", hide_input=True, err=True)
    return account.strip(), name.strip()


@click.command("abnormal-refund")
@click.argument("row_id", metavar="REFUND_ROW_ID", type=ROW_ID)
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(list(TO_CHOICES)),
    help="merchant-bank-card: back to the merchant's bank account; user-bank-card: to the user's debit card.",
)
@click.option("--bank-type", metavar="CODE", help="user-bank-card: WeChat's code of the user's bank, e.g. ICBC_DEBIT.")
@click.option(
    "--bank-details-file",
    "details_file",
    metavar="PATH",
    help="user-bank-card: a file of two lines, the account number then the holder's name ('-': standard"
    " input). Omitted on a terminal: asked for, without echo.",
)
@by_option("in the oplog")
@click.pass_obj
@audited("abnormal-refund")
def command(obj: CliContext, row_id: int, to: str, bank_type: str | None, details_file: str | None, who: str) -> None:
    """Send a refund WeChat Pay reports ABNORMAL (the user's card or account is frozen or closed) on to a
    bank card. WeChat moves it back to PROCESSING; the daemon follows it to SUCCESS and finishes the order.

    Refused (one line, exit 2) unless the row is ABNORMAL, pending and free. Exit 1 when the outcome is
    unknown (WeChat may have received it: the row says so, and the daemon's next poll tells).
    """
    from contextlib import ExitStack

    from cancel_scanner.engine.config import ConfigError
    from cancel_scanner.gateway.contract import Secret
    from cancel_scanner.operations.abnormal import Applied, BankCard, Refused, apply_abnormal_refund, check_request

    def refuse(code: str, message: str) -> NoReturn:
        click.echo(f"refund row {row_id}: refused {code}: {message}", err=True)
        sys.exit(EXIT_CONFIG)

    cfg = obj.config()
    if cfg.wechat.mode != "live":
        refuse(
            "SANDBOX_MODE",
            "wechat.mode is sandbox: the sandbox emulator lives inside the daemon's process and this"
            " command cannot reach its refunds; abnormal-refund works in live mode only",
        )
    card = None
    if TO_CHOICES[to] == "USER_BANK_CARD":
        if not bank_type:
            refuse("BANK_TYPE_MISSING", "user-bank-card needs --bank-type CODE (WeChat's bank code, e.g. ICBC_DEBIT)")
        if details_file is None and not sys.stdin.isatty():
            refuse(
                "BANK_DETAILS_MISSING",
                "user-bank-card needs --bank-details-file PATH (or a terminal to type them into)",
            )
        try:
            account, name = (
                _read_details_file(details_file, lambda line: click.echo(line, err=True))
                if details_file is not None
                else _prompt_details()
            )
        except _BadDetails as bad:
            refuse("BAD_BANK_DETAILS", str(bad))
        card = BankCard(bank_type, Secret(account), Secret(name))
        del account, name  # from here on only the Secrets hold them
    elif bank_type or details_file:
        refuse("BANK_DETAILS_NOT_WANTED", "merchant-bank-card takes no --bank-type or --bank-details-file")
    malformed = check_request(TO_CHOICES[to], card)
    if malformed is not None:
        refuse(*malformed)

    check_schema(cfg, tolerate_outage=False)
    from cancel_scanner.engine.clock import DbClock
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.settings import GatewayJobSettings
    from cancel_scanner.gateway.wechat_channel import build_gateway
    from cancel_scanner.scanners.poll_refund import PollRefund

    with ExitStack() as stack:
        try:
            gateway = build_gateway(cfg, stack)
        except ConfigError as err:
            fail_config(err)
        db = engine_for(cfg)
        stack.callback(db.dispose)
        try:
            result = apply_abnormal_refund(
                db,
                gateway,
                row_id,
                to=TO_CHOICES[to],
                card=card,
                by=who,
                clock=DbClock(db),
                lease_seconds=cast(GatewayJobSettings, cfg.job(PollRefund.name)).lease_seconds,
            )
        except Exception as exc:  # noqa: BLE001 - one line for the operator
            click.echo(f"cancel-scanner: abnormal-refund failed: {type(exc).__name__}: {short(exc)}", err=True)
            sys.exit(EXIT_FAILURE)
    if isinstance(result, Applied):
        obj.changed(f"refund row {row_id} ({result.out_refund_no}) sent on to {result.to}")
        t = tr(cfg.locale)
        where = t(N_("the merchant's bank card") if result.to == "MERCHANT_BANK_CARD" else N_("the user's bank card"))
        said = t(
            N_(
                "refund row {row} ({number}): sent on to {where}; WeChat says {status}, the daemon follows it to SUCCESS"
            )
        )
        click.echo(
            said.format(row=row_id, number=result.out_refund_no, where=where, status=result.wx_status)
            + (f" ({result.note})" if result.note else "")
        )
        return
    if isinstance(result, Refused):
        refuse(result.code, result.message)
    click.echo(f"refund row {row_id}: {result.code}: {result.message}", err=True)
    sys.exit(EXIT_FAILURE)
