"""The emulator's ledger: payments, refunds, the money counters, and refund status moving with time.

A mixin of gateway.emulator.Emulator: it keeps its state on the emulator,
under the emulator's one lock, and hands every refund that reaches a final
status (or ABNORMAL) to the notification sender.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from cancel_scanner.gateway.emulator.records import (
    STATUS_ABNORMAL,
    STATUS_CLOSED,
    STATUS_PROCESSING,
    STATUS_SUCCESS,
    STATUSES,
    Matcher,
    Payment,
    RecordedRefund,
    Refund,
    digits,
    invalid_apply_fields,
    is_out_refund_no,
    matches,
    refund_json,
)
from cancel_scanner.gateway.emulator.replies import ERRORS, Reply
from cancel_scanner.gateway.emulator.replies import error_reply as _error
from cancel_scanner.gateway.emulator.signing import RequestHeaders, Signer
from cancel_scanner.gateway.keys import KeyMaterial

SUCCESS_DELAY_SECONDS = 0.5
ABNORMAL_TYPES = frozenset({"MERCHANT_BANK_CARD", "USER_BANK_CARD"})
# Where an abnormal refund's money goes, as the refund object says. WeChat names the bank and the last
# digits of a user's card; the emulator keeps nothing of the card, so it names neither.
ABNORMAL_RECEIVED_ACCOUNT = {"MERCHANT_BANK_CARD": "商户银行账户", "USER_BANK_CARD": "用户银行卡"}
MAX_REFUNDS_PER_ORDER = 50
TICK_SECONDS = 0.05


class RefundLedger:
    # Provided by the Emulator:
    _lock: threading.RLock
    _changed: threading.Condition  # on _lock; wakes wait_for(), the ticker and the sender
    _stopping: threading.Event
    _clock: Callable[[], float]
    _queue_notification: Callable[[Refund], None]
    _signer: Signer
    keys: KeyMaterial

    def _init_ledger(self, success_delay: float, strict_payments: bool, min_refund_interval: float | None) -> None:
        self.success_delay = success_delay
        self.strict_payments = strict_payments
        self.min_refund_interval = min_refund_interval
        self._not_enough_until: float | None = None
        self._payments: dict[str, Payment] = {}
        self._payments_by_transaction: dict[str, Payment] = {}
        self._refunds: dict[str, Refund] = {}
        self._refunds_by_order: dict[str, list[Refund]] = {}
        self._processing: set[str] = set()
        self._pinned: set[str] = set()  # forced statuses: the status machine leaves them alone
        self._close_rules: list[Matcher] = []
        self._abnormal_rules: list[Matcher] = []
        # Counters for tests: the proof that no money moved twice.
        self.refunds_created: Counter[str] = Counter()  # out_refund_no -> refunds created (must stay <= 1)
        self.fen_refunded: Counter[str] = Counter()  # out_trade_no -> fen in refunds that are not CLOSED
        # apply-abnormal-refund calls accepted, by (out_refund_no, type). Of a user's bank details the
        # emulator keeps nothing: a test that wants to see them sets on_bank_details, a callable
        # (out_refund_no, bank_type, bank_account, real_name) given the decrypted text of each USER_BANK_CARD
        # call, and keeps what it needs (a yes or no, never the text).
        self.abnormal_applies: Counter[tuple[str, str]] = Counter()
        self.on_bank_details: Callable[[str, str, str, str], None] | None = None

    # -- test controls ---------------------------------------------------------

    def force_status(self, out_refund_no: str, status: str) -> None:
        """Rewrite a recorded refund's status for good (e.g. CLOSED after SUCCESS), so that later
        answers contradict earlier ones. No notification; time no longer moves it. KeyError if unknown."""
        if status not in STATUSES:
            raise ValueError(f"not a refund status: {status!r}")
        with self._changed:
            refund = self._refunds[out_refund_no]
            self._advance(refund, self._clock())  # what time had done already stays done first
            if (refund.status == STATUS_CLOSED) != (status == STATUS_CLOSED):
                # fen_refunded counts refunds that are not CLOSED, whatever history says.
                sign = -1 if status == STATUS_CLOSED else 1
                self.fen_refunded[refund.out_trade_no] += sign * refund.refund
            refund.status = status
            if status == STATUS_SUCCESS and refund.success_at is None:
                refund.success_at = self._clock()
            self._processing.discard(out_refund_no)
            self._pinned.add(out_refund_no)
            self._changed.notify_all()

    def not_enough_until(self, epoch: float | None) -> None:
        """Answer every new application 403 NOT_ENOUGH until clock() reaches epoch (None ends it)."""
        with self._lock:
            self._not_enough_until = epoch

    def register_payment(self, out_trade_no: str, total: int, transaction_id: str | None = None) -> None:
        with self._lock:
            self._add_payment(out_trade_no, total, transaction_id)

    def close_refunds_for(self, match: Matcher) -> None:
        """Refunds matching (out_trade_no, out_refund_no, transaction_id, or a predicate on the refund JSON) end CLOSED."""
        with self._lock:
            self._close_rules.append(match)

    def abnormal_for(self, match: Matcher) -> None:
        """Matching refunds go ABNORMAL instead of SUCCESS and stay there until resolve_abnormal()."""
        with self._lock:
            self._abnormal_rules.append(match)

    def resolve_abnormal(self, match: Matcher, status: str = STATUS_SUCCESS) -> int:
        """Move matching ABNORMAL refunds to SUCCESS (or CLOSED); returns how many moved."""
        if status not in (STATUS_SUCCESS, STATUS_CLOSED):
            raise ValueError("an ABNORMAL refund resolves to SUCCESS or CLOSED")
        moved = 0
        with self._changed:
            now = self._clock()
            for refund in self._refunds.values():
                if refund.status == STATUS_ABNORMAL and matches(match, refund):
                    self._finish(refund, status, now)
                    moved += 1
            self._changed.notify_all()
        return moved

    def _clear_refund_rules(self) -> None:
        with self._lock:
            self._close_rules.clear()
            self._abnormal_rules.clear()

    def recorded(self, out_refund_no: str) -> RecordedRefund | None:
        """The refund recorded under this number as it stands now on `clock` (its status moved on first,
        as a query would move it), or None if WeChat has none."""
        with self._changed:
            refund = self._refunds.get(out_refund_no)
            if refund is None:
                return None
            if self._advance(refund, self._clock()):
                self._changed.notify_all()
            return RecordedRefund(refund.refund_id, refund.status, refund.refund)

    def refund_status(self, out_refund_no: str) -> str | None:
        """The status now of the refund recorded under this number, or None."""
        recorded = self.recorded(out_refund_no)
        return recorded.status if recorded is not None else None

    def refund_id(self, out_refund_no: str) -> str | None:
        """WeChat's refund_id for the refund recorded under this number, or None."""
        recorded = self.recorded(out_refund_no)
        return recorded.refund_id if recorded is not None else None

    def tick(self) -> None:
        """Move every due PROCESSING refund on; the background ticker calls this every TICK_SECONDS."""
        with self._changed:
            now = self._clock()
            moved = False
            for number in list(self._processing):
                moved |= self._advance(self._refunds[number], now)
            if moved:
                self._changed.notify_all()

    def _tick_loop(self) -> None:
        while not self._stopping.wait(TICK_SECONDS):
            self.tick()

    # -- the two calls ------------------------------------------------------------

    def _apply(self, body: bytes) -> Reply:
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "PARAM_ERROR", "body is not JSON")
        invalid = invalid_apply_fields(data)
        if invalid:
            return _error(400, "PARAM_ERROR", invalid)
        amount = data["amount"]
        number = data["out_refund_no"]
        with self._changed:
            now = self._clock()
            existing = self._refunds.get(number)
            if existing is not None:
                return self._replay(existing, data, now)
            if self._not_enough_until is not None and now < self._not_enough_until:
                return _error(*ERRORS["not_enough"])
            payment, refused = self._payment_for(data)
            if refused is not None:
                return refused
            assert payment is not None
            if not payment.paid:
                return _error(400, "INVALID_REQUEST", f"trade {payment.out_trade_no} is {payment.state}, not paid")
            if amount["total"] != payment.total:
                return _error(400, "INVALID_REQUEST", "amount.total differs from the amount paid")
            if amount["refund"] > amount["total"]:
                return _error(400, "INVALID_REQUEST", "refund amount exceeds the order total")
            earlier = self._refunds_by_order.get(payment.out_trade_no, [])
            if len(earlier) >= MAX_REFUNDS_PER_ORDER:
                return _error(429, "FREQUENCY_LIMITED", "too many refunds on this order")
            if self.min_refund_interval and earlier and now - earlier[-1].created_at < self.min_refund_interval:
                return _error(429, "FREQUENCY_LIMITED", "refunds on one order must be a minute apart")
            if amount["refund"] > payment.total - self.fen_refunded[payment.out_trade_no]:
                return _error(400, "INVALID_REQUEST", "refund amount exceeds what is left to refund on the order")
            refund = Refund(
                refund_id=digits("50", 32),
                out_refund_no=number,
                out_trade_no=payment.out_trade_no,
                transaction_id=payment.transaction_id,
                refund=amount["refund"],
                total=amount["total"],
                notify_url=data.get("notify_url") or None,
                created_at=now,
            )
            self._refunds[number] = refund
            self._refunds_by_order.setdefault(payment.out_trade_no, []).append(refund)
            self._processing.add(number)
            self.refunds_created[number] += 1
            self.fen_refunded[payment.out_trade_no] += refund.refund
            payment.state = "REFUND"
            self._changed.notify_all()
            return Reply(200, refund_json(refund))

    def _replay(self, existing: Refund, data: dict[str, Any], now: float) -> Reply:
        amount = data["amount"]
        same_order = data.get("out_trade_no") == existing.out_trade_no or (
            bool(data.get("transaction_id")) and data.get("transaction_id") == existing.transaction_id
        )
        if not same_order or amount["refund"] != existing.refund or amount["total"] != existing.total:
            return _error(400, "INVALID_REQUEST", "out_refund_no was already used for a different refund")
        self._advance(existing, now)
        return Reply(200, refund_json(existing))

    def _payment_for(self, data: dict[str, Any]) -> tuple[Payment | None, Reply | None]:
        # invalid_apply_fields let the application through: each is a string or absent, and one is given.
        out_trade_no: str | None = data.get("out_trade_no")
        transaction_id: str | None = data.get("transaction_id")
        trade_key = out_trade_no or transaction_id
        assert trade_key, "an application names out_trade_no or transaction_id"
        # Without a transaction_id, trade_key is the out_trade_no.
        payment = self._payments_by_transaction.get(transaction_id) if transaction_id else self._payments.get(trade_key)
        if payment is not None:
            return payment, None
        if self.strict_payments:
            return None, _error(404, "RESOURCE_NOT_EXISTS", "order does not exist")
        # Lenient default: the first refund of an unknown order says what was paid.
        return self._add_payment(trade_key, data["amount"]["total"], transaction_id), None

    def _add_payment(self, out_trade_no: str, total: int, transaction_id: str | None) -> Payment:
        payment = Payment(out_trade_no, total, transaction_id or digits("4200", 28), success_at=self._clock())
        self._payments[out_trade_no] = payment
        self._payments_by_transaction[payment.transaction_id] = payment
        return payment

    def _query(self, number: str) -> Reply:
        if not is_out_refund_no(number):
            return _error(400, "PARAM_ERROR", "out_refund_no is malformed")
        with self._changed:
            refund = self._refunds.get(number)
            if refund is None:
                return _error(404, "RESOURCE_NOT_EXISTS", "refund does not exist")
            if self._advance(refund, self._clock()):
                self._changed.notify_all()
            return Reply(200, refund_json(refund))

    def _apply_abnormal(self, refund_id: str, headers: RequestHeaders, body: bytes) -> Reply:
        """apply-abnormal-refund for WeChat's ``refund_id``: an ABNORMAL refund goes on to a bank card,
        PROCESSING again, then SUCCESS after ``success_delay``.

        Never logs the body: for USER_BANK_CARD it carries the user's account and name (encrypted).
        """
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "PARAM_ERROR", "body is not JSON")
        if not isinstance(data, dict) or not is_out_refund_no(str(data.get("out_refund_no") or "")):
            return _error(400, "PARAM_ERROR", "out_refund_no is missing or malformed")
        kind = data.get("type")
        if kind not in ABNORMAL_TYPES:
            return _error(400, "PARAM_ERROR", "type must be MERCHANT_BANK_CARD or USER_BANK_CARD")
        number = data["out_refund_no"]
        if kind == "USER_BANK_CARD":
            refused = self._open_bank_details(number, headers, data)
            if refused is not None:
                return refused
        with self._changed:
            refund = self._refunds.get(number)
            if refund is None or refund.refund_id != refund_id:
                return _error(404, "RESOURCE_NOT_EXISTS", "refund does not exist")
            now = self._clock()
            self._advance(refund, now)
            if refund.status != STATUS_ABNORMAL:
                # A well-formed request the refund's state does not allow is WeChat's INVALID_REQUEST
                # (PARAM_ERROR is for a malformed one): so answers a second apply, once the first has
                # moved the refund on to PROCESSING, and an apply for a refund that never was ABNORMAL.
                return _error(
                    400, "INVALID_REQUEST", f"the refund is {refund.status}, not ABNORMAL: nothing to apply for"
                )
            refund.status = STATUS_PROCESSING
            refund.abnormal_applied_at = now
            refund.channel = "OTHER_BANKCARD"
            refund.received_account = ABNORMAL_RECEIVED_ACCOUNT[kind]
            self._pinned.discard(number)  # a forced ABNORMAL moves on like any other once applied for
            self._processing.add(number)
            self.abnormal_applies[(number, kind)] += 1
            self._changed.notify_all()
            return Reply(200, refund_json(refund))

    def _open_bank_details(self, number: str, headers: RequestHeaders, data: dict[str, Any]) -> Reply | None:
        """Check a USER_BANK_CARD call's bank details: the refusal, or None once they decrypt.
        The plain text goes to on_bank_details (if a test set it) and is then dropped."""
        bank_type = data.get("bank_type")
        if not isinstance(bank_type, str) or not bank_type:
            return _error(400, "PARAM_ERROR", "USER_BANK_CARD needs bank_type")
        if not data.get("bank_account") or not data.get("real_name"):
            return _error(400, "PARAM_ERROR", "USER_BANK_CARD needs bank_account and real_name")
        if headers.get("Wechatpay-Serial") != self.keys.platform_public_key_id:
            # Encrypted fields name the key they were encrypted with; any other cannot be opened.
            return _error(
                400, "PARAM_ERROR", "Wechatpay-Serial must name the platform public key the fields are encrypted with"
            )
        account = self._signer.decrypt_field(data["bank_account"])
        name = self._signer.decrypt_field(data["real_name"])
        if not account or not name:
            return _error(400, "PARAM_ERROR", "bank_account or real_name does not decrypt with the platform key")
        hook = self.on_bank_details
        if hook is not None:
            hook(number, bank_type, account, name)
        return None

    # -- the status machine ---------------------------------------------------------

    def _advance(self, refund: Refund, now: float) -> bool:
        """Lazily apply the status machine; True if the refund moved. Caller holds the lock."""
        since = refund.abnormal_applied_at if refund.abnormal_applied_at is not None else refund.created_at
        if refund.status != STATUS_PROCESSING or now < since + self.success_delay:
            return False
        if refund.out_refund_no in self._pinned:
            return False
        due = since + self.success_delay
        if refund.abnormal_applied_at is not None:
            self._finish(refund, STATUS_SUCCESS, due)  # the bank card the merchant named takes the money
        elif any(matches(rule, refund) for rule in self._close_rules):
            self._finish(refund, STATUS_CLOSED, due)
        elif any(matches(rule, refund) for rule in self._abnormal_rules):
            self._finish(refund, STATUS_ABNORMAL, due)
        else:
            self._finish(refund, STATUS_SUCCESS, due)
        return True

    def _finish(self, refund: Refund, status: str, at: float) -> None:
        refund.status = status
        self._processing.discard(refund.out_refund_no)
        if status == STATUS_SUCCESS:
            refund.success_at = at
        elif status == STATUS_CLOSED:
            self.fen_refunded[refund.out_trade_no] -= refund.refund  # a closed refund moved no money
        self._queue_notification(refund)
