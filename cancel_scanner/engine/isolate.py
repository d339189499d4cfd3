"""One bad row costs only itself: finding the rows that fail a batch's writes, in the same pass.

A stage's writes are set-based, so one row the shop's database refuses (a trigger's SIGNAL, a
constraint it would break) fails the statement for the whole batch. The batch is tried whole in a
savepoint; when a row is at fault a binary search in savepoints finds it (and any other), committing
every part that succeeds. Every good row commits in the transaction it was claimed in; one bad row in
a batch of n costs log2(n) to 2 x log2(n) more tries (8 to 16 for 200), not a stalled stage.

What is not a row's fault (a lost connection, a deadlock or a lost claim, a revoked privilege) is
raised at once: the whole transaction rolls back and the stage backs off, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from loguru import logger
from sqlalchemy import Connection

from cancel_scanner.engine.errors import SHOP_REFUSED, shop_refusal
from cancel_scanner.engine.logs import held_until_commit, release
from cancel_scanner.engine.outcome import Retry, clip

Item = TypeVar("Item")
Result = TypeVar("Result")

# What a merchant or a DBA reads for a row that failed for a reason nobody foresaw (a bug): the
# details go to the log (with the traceback) and, short, to the row's last_error, never to result_msg.
INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True)
class Isolated(Generic[Item, Result]):
    """What each part of a batch that committed returned, and the items at fault with their errors."""

    results: list[Result]
    faults: list[tuple[Item, BaseException]]


def isolate(
    conn: Connection,
    items: Sequence[Item],
    attempt: Callable[[list[Item]], Result],
    is_row_fault: Callable[[BaseException], bool],
    *,
    atomic: bool = False,
) -> Isolated[Item, Result]:
    """``attempt`` the items whole, in a savepoint; on a row's fault, find the items at fault.

    A binary search that tries one half only: when the first half of a failed part commits, the
    fault is in the second, which is split again without being tried whole (when the first half fails
    too, the second is not known and is tried). One bad row in n costs log2(n) to 2 x log2(n) tries
    (8 to 16 for 200) over about n rows in all: a whole batch's worth of work once more.
    ``atomic``: ``attempt`` undoes its own writes when it raises (its own savepoint), so none is added.
    """
    results: list[Result] = []
    faults: list[tuple[Item, BaseException]] = []

    def tried(part: list[Item]) -> BaseException | None:
        savepoint = None if atomic else conn.begin_nested()
        with held_until_commit() as events:  # what the try logs is written only if it commits
            try:
                result = attempt(part)
            except Exception as exc:
                if savepoint is not None:
                    undo(savepoint, exc)
                if not is_row_fault(exc):
                    raise
                return exc
        if savepoint is not None:
            savepoint.commit()
        release(events)
        results.append(result)
        return None

    def search(part: list[Item], failed: BaseException) -> None:
        # ``part`` failed with ``failed``: some item of it is at fault.
        while len(part) > 1:
            first, second = part[: len(part) // 2], part[len(part) // 2 :]
            failed_first = tried(first)
            if failed_first is None:
                part = second  # the first half is done: the fault is in the second
                continue
            search(first, failed_first)
            failed_second = tried(second)  # not known either way: tried whole
            if failed_second is None:
                return
            part, failed = second, failed_second
        faults.append((part[0], failed))

    if items:
        whole = list(items)
        failed = tried(whole)
        if failed is not None:
            search(whole, failed)
    return Isolated(results, faults)


def undo(savepoint: Any, exc: BaseException) -> None:
    """Roll ``savepoint`` back after ``exc``; if it is gone with the whole transaction (the server
    rolled back a deadlock), ``exc`` is the batch's error."""
    if not savepoint.is_active:
        return
    try:
        savepoint.rollback()
    except Exception:  # noqa: BLE001 - the savepoint is gone with the transaction: the batch's error is exc
        raise exc from None


def try_in_savepoint(conn: Connection, write: Callable[[], None]) -> BaseException | None:
    """Run ``write`` in a savepoint; the error that undid it, or None."""
    savepoint = conn.begin_nested()
    with held_until_commit() as events:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - any error undoes the one write; the caller decides
            undo(savepoint, exc)
            return exc
    savepoint.commit()
    release(events)
    return None


def fault_outcome(
    stage_name: str,
    row_id: Hashable,
    exc: BaseException,
    *,
    fact: str | None = None,
    bugs_stay_pending: bool = False,
    fact_stays_pending: bool = False,
    give_up_code: str | None = None,
) -> Retry:
    """The outcome of a row whose writes failed: its attempt counted, a reason a person can read.

    ``fact``: what the payment channel already did for the row ("refund accepted by WeChat Pay ..."),
    said first. ``bugs_stay_pending``: a failure nobody foresaw never gives up (a merchant's request
    is never answered with it). ``fact_stays_pending``: the row never ends 1/0 while the channel's
    fact is unrecorded (for a stage whose 1/0 would mean "the channel refused"). ``give_up_code``: what
    a row that gives up ends with, if not the fault's own code (OUTCOME_UNKNOWN after a call).
    """
    refused = shop_refusal(exc)
    log = logger.bind(stage=stage_name, row_id=row_id)
    said = f"{fact}, not recorded here yet: " if fact else ""
    if refused is not None:
        log.bind(action="row_refused", code=SHOP_REFUSED).warning("{}{}", said, refused)
        return Retry(
            SHOP_REFUSED,
            clip(f"{said}{refused}; tried again"),
            endless=fact_stays_pending and fact is not None,
            give_up_message=f"{said}{refused}",
            give_up_code=give_up_code,
        )
    # A bug: the traceback for whoever fixes it, and the row tried again later rather than answered.
    log.opt(exception=exc).bind(action="row_crashed", code=INTERNAL_ERROR).error(
        "{}row raised {}", said, type(exc).__name__
    )
    return Retry(
        INTERNAL_ERROR,
        clip(f"{said}unexpected {type(exc).__name__} (see the daemon's log); tried again"),
        endless=bugs_stay_pending or (fact_stays_pending and fact is not None),
        give_up_message=f"{said}unexpected {type(exc).__name__} (see the daemon's log)",
        give_up_code=give_up_code,
    )
