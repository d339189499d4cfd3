"""The emulator's payment desk: trades by out_trade_no, the user paying them, query and close.

A mixin of gateway.emulator.Emulator, on its one lock, sharing the ledger's trades (so a refund
is accepted only for a trade that was paid, and never above what was paid). WeChat tells the
shop of a payment by a notification this emulator does not send: a test that makes a user pay
and does not write the payment to the database is the "lost notification" case.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from cancel_scanner.gateway.emulator.records import Payment, digits, payment_json
from cancel_scanner.gateway.emulator.replies import Reply
from cancel_scanner.gateway.emulator.replies import error_reply as _error
from cancel_scanner.gateway.keys import KeyMaterial

NOT_FOUND = (404, "ORDER_NOT_EXIST", "order does not exist")


class PaymentDesk:
    # Provided by the Emulator (and its ledger):
    _lock: threading.RLock
    _changed: threading.Condition
    _clock: Callable[[], float]
    _payments: dict[str, Payment]
    _payments_by_transaction: dict[str, Payment]
    keys: KeyMaterial

    def _init_payments(self) -> None:
        # "queries", "closes" (calls answered), "refused_after_close" (a user who tried to pay a closed trade)
        self.payment_counts: Counter[str] = Counter()
        self.closed_trades: Counter[str] = Counter()  # out_trade_no -> closes that closed it (must stay <= 1)
        self._answered_with: dict[str, str] = {}  # out_trade_no -> the trade whose object its query answers
        self._answered_as: dict[str, dict[str, str | None]] = {}  # out_trade_no -> another mchid, appid, currency

    # -- test controls -----------------------------------------------------------------------

    def create_trade(self, out_trade_no: str, total: int) -> None:
        """The shop made a prepay for this order: the trade exists, NOTPAY."""
        with self._changed:
            self._payments[out_trade_no] = Payment(out_trade_no, total, digits("4200", 28), state="NOTPAY")
            self._changed.notify_all()

    def user_starts_paying(self, out_trade_no: str) -> None:
        """The user is on the password screen: USERPAYING (a close now must wait)."""
        with self._changed:
            self._trade(out_trade_no).state = "USERPAYING"

    def user_pays(self, out_trade_no: str) -> bool:
        """The user pays; False (and counted) when the trade was closed first. The database is not told."""
        with self._changed:
            trade = self._trade(out_trade_no)
            if trade.state == "CLOSED":
                self.payment_counts["refused_after_close"] += 1
                return False
            if not trade.paid:
                self._mark_paid(trade)
            self._changed.notify_all()
            return True

    def pays_while_closing(self, out_trade_no: str) -> None:
        """The next close of this trade is answered 204, and the user's payment goes through anyway."""
        with self._changed:
            self._trade(out_trade_no).pays_while_closing = True

    def answers_as(
        self, out_trade_no: str, *, mchid: str | None = None, appid: str | None = None, currency: str | None = None
    ) -> None:
        """Queries of this trade answer naming another merchant, app or currency (correctly signed)."""
        with self._changed:
            self._answered_as[out_trade_no] = {"mchid": mchid, "appid": appid, "currency": currency}

    def answers_about(self, out_trade_no: str, other: str) -> None:
        """Queries of this trade answer with another trade's object (a mixed-up answer, correctly signed)."""
        with self._changed:
            self._answered_with[out_trade_no] = other

    def trade_state(self, out_trade_no: str) -> str | None:
        with self._lock:
            trade = self._payments.get(out_trade_no)
            return trade.state if trade else None

    # -- the two calls -------------------------------------------------------------------------

    def _query_payment(self, out_trade_no: str) -> Reply:
        with self._changed:
            self.payment_counts["queries"] += 1
            trade = self._payments.get(self._answered_with.get(out_trade_no, out_trade_no))
            if trade is None:
                return _error(*NOT_FOUND)
            other = self._answered_as.get(out_trade_no, {})
            data = payment_json(trade, other.get("mchid") or self.keys.mchid, other.get("appid") or self.keys.appid)
            if other.get("currency"):
                data["amount"]["currency"] = other["currency"]
            return Reply(200, data)

    def _close_payment(self, out_trade_no: str) -> Reply:
        with self._changed:
            self.payment_counts["closes"] += 1
            trade = self._payments.get(out_trade_no)
            if trade is None:
                return _error(*NOT_FOUND)
            if trade.pays_while_closing:
                trade.pays_while_closing = False
                self._mark_paid(trade)
                return Reply(204)  # what WeChat can answer while the user finishes paying
            if trade.paid:
                return _error(400, "ORDERPAID", "the order is paid")
            if trade.state == "USERPAYING":
                return _error(202, "USER_PAYING", "the user is paying")
            if trade.state == "CLOSED":
                return _error(400, "ORDER_CLOSED", "the order is closed")
            trade.state = "CLOSED"
            self.closed_trades[out_trade_no] += 1
            self._changed.notify_all()
            return Reply(204)

    # -- internals ------------------------------------------------------------------------------

    def _trade(self, out_trade_no: str) -> Payment:
        trade = self._payments.get(out_trade_no)
        if trade is None:
            raise KeyError(f"no trade {out_trade_no!r}: create_trade() or register_payment() first")
        return trade

    def _mark_paid(self, trade: Payment) -> None:
        trade.state, trade.success_at = "SUCCESS", self._clock()
        self._payments_by_transaction[trade.transaction_id] = trade
