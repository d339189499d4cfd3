"""`abnormal-refund`: send a refund WeChat Pay reports ABNORMAL on to a bank card.

ABNORMAL means the user's card or balance account is frozen or closed: the money stays with WeChat
until the merchant names another way, the merchant's own bank card (MERCHANT_BANK_CARD) or the
user's debit card (USER_BANK_CARD, with the bank's code, the account number and the holder's name).
WeChat then moves the refund back to PROCESSING and on to SUCCESS; poll_refund follows it there like
any refund, and the rest of the flow (sync_result, stock, sales) runs as usual.

One row, three short steps, never a transaction open across the call:
1. lease the row as poll_refund does (lease_owner, lease_until on refund_order, the database's
   clock), with an owner id of our own and only if no one holds it: a daemon querying the refund at
   that moment keeps it, and we refuse; while we hold it no daemon claims it;
2. the gateway call, bounded by the lease (it cannot outlive it);
3. one transaction: wx_status PROCESSING, due for polling now, last_error cleared, lease released,
   oplog ABNORMAL_REFUND_APPLIED (the type and who; never a bank detail).
An unknown outcome (a timeout) leaves the row ABNORMAL, due for polling now, with a note that WeChat
may have received the request: the next poll says whether it did (PROCESSING) or not (ABNORMAL).

The user's bank details are Secrets from the moment they are read: nothing here stores, logs or
prints them, and only the gateway reveals them, to the SDK that encrypts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from loguru import logger
from sqlalchemy import Engine, Row, or_, select, update

import cancel_scanner.gateway.contract as gw
from cancel_scanner.engine.config import LEASE_SAFETY_MARGIN_SECONDS
from cancel_scanner.engine.outcome import clip
from cancel_scanner.engine.registry import new_owner_id
from cancel_scanner.engine.sql import locked
from cancel_scanner.models import oplog, refund_order
from cancel_scanner.scanners.shop import refund_event, write_oplog
from cancel_scanner.scanners.submit_refund import matches

r = refund_order.c
EVENT = "ABNORMAL_REFUND_APPLIED"
# How last_error reads when WeChat may or may not have taken the request: the operator must not simply repeat it.
MAYBE_APPLIED = "ABNORMAL_REFUND_UNKNOWN"
ACCOUNT_DIGITS = (8, 32)  # a debit card number: 16 to 19 digits in China; a little room either side
NAME_MAX_CHARS = 64
BUSY = "ROW_BUSY"
BUSY_WAIT_SECONDS = 10.0  # a daemon's query holds the row for moments; a batch's lease, a few seconds at most
BUSY_RETRY_SECONDS = 0.25

_log = logger.bind(stage="abnormal_refund")


@dataclass(frozen=True)
class BankCard:
    """The user's debit card for USER_BANK_CARD. repr shows the bank's code only."""

    bank_type: str
    account: gw.Secret
    name: gw.Secret


@dataclass(frozen=True)
class Applied:
    """WeChat accepted: the refund goes to the bank card; the daemon follows it to SUCCESS."""

    row_id: int
    out_refund_no: str
    to: str
    wx_status: str  # what WeChat's answer said (PROCESSING)
    note: str = ""


@dataclass(frozen=True)
class Refused:
    """Not sent, or WeChat said no: nothing changed and no money moved."""

    row_id: int
    code: str
    message: str


@dataclass(frozen=True)
class Undecided:
    """The call failed for now or its outcome is unknown; ``message`` says what to do before trying again."""

    row_id: int
    code: str
    message: str


Result = Applied | Refused | Undecided


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def check_request(to: str, card: BankCard | None) -> tuple[str, str] | None:
    """(code, message) when the request itself is malformed, before any database or network; None if fine.

    Messages name what is wrong, never a bank detail's value.
    """
    if to not in gw.ABNORMAL_REFUND_TYPES:
        return "BAD_TYPE", f"--to must be merchant-bank-card or user-bank-card, not {to!r}"
    if to == gw.ABNORMAL_TO_MERCHANT:
        return ("BANK_DETAILS_NOT_WANTED", "merchant-bank-card takes no bank type or bank details") if card else None
    if card is None:
        return "BANK_DETAILS_MISSING", "user-bank-card needs --bank-type and the bank details"
    if not gw.BANK_TYPE_PATTERN.match(card.bank_type or ""):
        return (
            "BAD_BANK_TYPE",
            "--bank-type must be WeChat's bank code, upper-case letters, digits and _ (e.g. ICBC_DEBIT)",
        )
    account = card.account.reveal()
    low, high = ACCOUNT_DIGITS
    if not (account.isascii() and account.isdigit() and low <= len(account) <= high):
        return "BAD_ACCOUNT_NUMBER", f"the account number must be {low} to {high} digits, nothing else (no spaces)"
    name = card.name.reveal()
    if not name or len(name) > NAME_MAX_CHARS or not name.isprintable():
        return "BAD_HOLDER_NAME", f"the holder's name must be 1 to {NAME_MAX_CHARS} printable characters"
    return None


def apply_abnormal_refund(
    db: Engine,
    gateway: gw.AbnormalRefundGateway,
    row_id: int,
    *,
    to: str,
    card: BankCard | None = None,
    by: str,
    clock: Callable[[], datetime],
    lease_seconds: float,
    busy_wait_seconds: float = BUSY_WAIT_SECONDS,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """One refund row (refund_order.id): lease it, ask WeChat, write what it said. See the module docstring.

    A row the daemon holds is tried again every BUSY_RETRY_SECONDS for ``busy_wait_seconds`` (its
    query is over in moments), then refused ROW_BUSY.
    """
    malformed = check_request(to, card)
    if malformed is not None:
        return Refused(row_id, *malformed)
    owner = f"abnormal-refund:{new_owner_id()}"[:64]
    give_up_at = monotonic() + busy_wait_seconds
    while True:
        leased_at = monotonic()  # before the lease's own transaction: the deadline errs early
        try:
            row = _lease(db, row_id, owner, clock(), lease_seconds)
            break
        except _Refusal as refusal:
            if refusal.code != BUSY or leased_at + BUSY_RETRY_SECONDS > give_up_at:
                return Refused(row_id, refusal.code, refusal.message)
        sleep(BUSY_RETRY_SECONDS)
    log = _log.bind(row_id=row.id, out_refund_no=row.out_refund_no, to=to, by=by)
    end = leased_at + lease_seconds - LEASE_SAFETY_MARGIN_SECONDS
    try:
        result: Any = gateway.abnormal_refund(
            row.wx_refund_id,
            row.out_refund_no,
            to=to,
            bank_type=card.bank_type if card else None,
            bank_account=card.account if card else None,
            real_name=card.name if card else None,
            deadline=lambda: end,
        )
    except Exception as exc:  # noqa: BLE001 - a bug in the client: the bytes may have left, so unknown
        # The type only: an exception's text is the one place a value could slip through.
        log.bind(action="call_crashed").warning("abnormal refund call raised {}", type(exc).__name__)
        result = gw.UnknownOutcome("CLIENT_ERROR", f"the client raised {type(exc).__name__}")
    return _record(db, row, owner, result, to=to, by=by, now=clock(), log=log)


def _lease(db: Engine, row_id: int, owner: str, now: datetime, lease_seconds: float) -> Row:
    """The row, leased to ``owner``; _Refusal when it may not be sent (missing, not ABNORMAL, held)."""
    with db.begin() as conn:
        row = conn.execute(locked(conn, select(refund_order).where(r.id == row_id))).first()
        if row is None:
            raise _Refusal("REFUND_NOT_FOUND", f"refund row {row_id} does not exist")
        if row.progress_scanned != 0 or row.submit_success != 1:
            state = "finished" if row.progress_scanned else "not accepted by WeChat yet"
            raise _Refusal(
                "NOT_PENDING",
                f"refund {row.out_refund_no} is {state} ({row.wx_status or 'no status'}):"
                " only a refund WeChat reports ABNORMAL can go to a bank card",
            )
        if row.wx_status != gw.STATUS_ABNORMAL:
            raise _Refusal(
                "NOT_ABNORMAL",
                f"refund {row.out_refund_no} is {row.wx_status or 'without a status'}, not ABNORMAL:"
                " only a refund WeChat reports ABNORMAL can go to a bank card",
            )
        if not row.wx_refund_id:
            raise _Refusal(
                "NO_WX_REFUND_ID",
                f"refund {row.out_refund_no} has no WeChat refund_id on the row;"
                " wait for the daemon's next poll to record it",
            )
        if row.lease_until is not None and row.lease_until >= now:
            raise _Refusal(
                BUSY,
                f"refund {row.out_refund_no} is being queried by {row.lease_owner} (leased until"
                f" {row.lease_until:%Y-%m-%d %H:%M:%S} UTC); try again in a few seconds",
            )
        # Guarded as the daemon's claims are: whoever else got there between our read and now wins.
        taken = conn.execute(
            update(refund_order)
            .where(
                r.id == row.id,
                r.progress_scanned == 0,
                r.wx_status == gw.STATUS_ABNORMAL,
                or_(r.lease_until.is_(None), r.lease_until < now),
            )
            .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds))
        ).rowcount
        if taken != 1:
            raise _Refusal(BUSY, f"refund {row.out_refund_no} was taken by another process just now; try again")
    return row


def _record(db: Engine, row: Row, owner: str, result: Any, *, to: str, by: str, now: datetime, log: Any) -> Result:
    """Write what WeChat said (one transaction) and release the lease."""
    mine = [r.id == row.id, r.lease_owner == owner]
    released = {"lease_owner": None, "lease_until": None}
    if isinstance(result, gw.Accepted) and not (
        matches(result.refund, row) and result.refund.refund_id == row.wx_refund_id
    ):
        # A verified answer about another refund or amount: we cannot tell what happened to ours.
        result = gw.UnknownOutcome("RESPONSE_MISMATCH", f"the answer is about refund {result.refund.out_refund_no}")
    with db.begin() as conn:
        if isinstance(result, gw.Accepted):
            # Due now: the daemon's next poll takes it and follows it to SUCCESS on its schedule.
            moved = conn.execute(
                update(refund_order)
                .where(*mine, r.progress_scanned == 0)
                .values(wx_status=gw.STATUS_PROCESSING, next_attempt_at=now, last_error=None, attempts=0, **released)
            ).rowcount
            event = refund_event(EVENT, row.refund_seq)
            first = (
                conn.execute(select(oplog.c.id).where(oplog.c.order_id == row.order_id, oplog.c.event == event)).first()
                is None
            )
            if first:  # a refund ABNORMAL again after an earlier apply keeps its first event (once per order and event)
                write_oplog(conn, [(row.order_id, event, f"{to} by {by} (WeChat refund_id {row.wx_refund_id})")])
            note = (
                ""
                if moved
                else "the row's lease ran out before the answer was written: the daemon's poll records the status"
            )
            log.bind(
                action="applied",
                wx_status=result.refund.status,
                request_id=result.request_id,
                lease_kept=bool(moved),
                oplog_written=first,
            ).info("abnormal refund applied: WeChat sends the money to the bank card")
            return Applied(row.id, row.out_refund_no, to, result.refund.status, note)
        if isinstance(result, gw.UnknownOutcome):
            message = (
                f"{MAYBE_APPLIED}: the apply ({to}) by {by} got no clear answer ({result.code}); WeChat may have"
                " received it. Check before repeating: the next poll shows PROCESSING if it did"
            )
            conn.execute(
                update(refund_order).where(*mine).values(last_error=clip(message), next_attempt_at=now, **released)
            )
            log.bind(action="unknown", code=result.code, request_id=result.request_id).warning("{}", message)
            return Undecided(row.id, MAYBE_APPLIED, message)
        if isinstance(result, gw.Permanent):
            # Most often INVALID_REQUEST: WeChat no longer sees it ABNORMAL (an earlier apply went through). Our
            # wx_status is then stale: make it due, so the poll writes what WeChat says.
            conn.execute(update(refund_order).where(*mine).values(next_attempt_at=now, **released))
            message = f"WeChat Pay refused: {result.code}: {result.message}"
            log.bind(action="refused", code=result.code, request_id=result.request_id).warning("{}", message)
            return Refused(row.id, "WECHAT_REFUSED", clip(message))
        conn.execute(update(refund_order).where(*mine).values(**released))
        if isinstance(result, gw.ConfigError):
            message = f"WeChat Pay refused our credentials: {result.code}: {result.message} (check the keys, serial and clock)"
            log.bind(action="config_error", code=result.code).error("{}", message)
            return Refused(row.id, "WECHAT_CONFIG_ERROR", clip(message))
        if isinstance(result, gw.NotSent):
            message = f"nothing was sent ({result.code}: {result.message}); safe to try again"
            log.bind(action="not_sent", code=result.code).warning("{}", message)
            return Undecided(row.id, "NOT_SENT", message)
        if isinstance(result, gw.RetryLater):
            message = f"WeChat Pay refused for now ({result.code}: {result.message}); no money moved, try again later"
            log.bind(action="retry_later", code=result.code, request_id=result.request_id).warning("{}", message)
            return Undecided(row.id, "TRY_AGAIN_LATER", clip(message))
    raise TypeError(f"not a gateway result: {type(result).__name__}")
