"""A new payment channel needs its gateway and one registry line: no engine, scanner or stage module.

A throwaway channel ("coinpay", an in-memory refund desk answering the gateway contract) is declared
here and registered with ``CHANNELS.with_channel``. Orders paid through it are cancelled and refunded
through it, beside WeChat Pay's orders refunded through the emulator, by the very stages and daemon
wiring (``build_app``), on SQLite and MariaDB. A row of a channel no daemon here serves is never sent
and costs no other row anything.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import cancel_scanner.gateway.contract as gw
from cancel_scanner.app import build_app
from cancel_scanner.gateway.registry import CHANNELS
from tests.flow import World, add_goods, add_order, refunds, request_cancel, row, rows, test_config


class CoinPay:
    """A refund desk: every refund is accepted PROCESSING and is SUCCESS from its first query on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: dict[str, gw.RefundRequest] = {}
        self.calls: list[tuple[str, str]] = []

    def _refund(self, req: gw.RefundRequest, status: str) -> gw.Refund:
        now = datetime.now(UTC)
        return gw.Refund(
            refund_id=f"coin-{req.out_refund_no}",
            out_refund_no=req.out_refund_no,
            out_trade_no=req.out_trade_no,
            transaction_id="coin-txn",
            status=status,
            success_time=now if status == "SUCCESS" else None,
            create_time=now,
            refund_amount=req.refund_amount,
            total_amount=req.total_amount,
            user_received_account="coin wallet",
            channel="ORIGINAL",
        )

    def apply(self, req: gw.RefundRequest, *, deadline: Any = None) -> gw.GatewayResult:
        with self.lock:
            self.calls.append(("apply", req.out_refund_no))
            self.applied.setdefault(req.out_refund_no, req)
        return gw.Accepted(self._refund(req, gw.STATUS_PROCESSING))

    def query(self, out_refund_no: str, *, deadline: Any = None) -> gw.GatewayResult:
        with self.lock:
            self.calls.append(("query", out_refund_no))
            req = self.applied.get(out_refund_no)
        if req is None:
            return gw.Permanent("RESOURCE_NOT_EXISTS", "no such refund")
        return gw.Accepted(self._refund(req, gw.STATUS_SUCCESS))

    def calls_within(self, endpoint: str, seconds: float) -> int | None:
        return None  # unpaced


class CoinPayChannel:
    name = "coinpay"
    desk = CoinPay()

    @classmethod
    def build(cls, config: Any, stack: ExitStack) -> CoinPay:
        return cls.desk


def paid_through(db, order_ids, channel: str) -> None:
    """The shop's order system records the channel an order was paid through."""
    with db.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE goods_order2 SET channel = '{channel}' WHERE id IN ({', '.join(map(str, order_ids))})"
        )


def test_a_throwaway_channel_registered_in_one_line_refunds_its_orders_beside_wechats(db, db_url, sandbox):
    CoinPayChannel.desk = CoinPay()
    channels = CHANNELS.with_channel(CoinPayChannel)  # the one line a new channel needs
    add_goods(db, 1, stock=10, sales=20)
    for order_id in range(1, 8):
        add_order(db, order_id, amount=1000 + order_id)
    paid_through(db, [4, 5, 6], "coinpay")
    paid_through(db, [7], "nopay")  # no daemon here serves it
    for order_id in range(1, 8):
        request_cancel(db, order_id)

    config = test_config(
        db_url, wechat={"mode": "sandbox", "timeout_seconds": [2, 2], "sandbox": {"success_delay_seconds": 0}}
    )
    world = World(db=db, config=config, sandbox=sandbox)
    with ExitStack() as stack:
        app = build_app(world.config, stack, clock=world.clock, channels=channels)
        emulator = app.sandbox.emulator
        for _ in range(10):
            app.runner.run_until_idle(world.clock.now)
            world.clock.advance(5)
        refund_rows = refunds(db)

        # Every order of a served channel: cancelled, refunded through its own channel, stock and sales moved.
        for order_id in range(1, 7):
            order = row(db, "goods_order2", order_id)
            assert (order.order_status, order.refund_status) == ("CANCELLED", "REFUNDED"), order_id
            assert refund_rows[order_id]["channel"] == ("coinpay" if order_id >= 4 else "wechat")
        assert rows(db, "SELECT stock, sales FROM goods WHERE id = 1")[0] == {"stock": 16, "sales": 14}

        coin_numbers = {refund_rows[i]["out_refund_no"] for i in (4, 5, 6)}
        wechat_numbers = {refund_rows[i]["out_refund_no"] for i in (1, 2, 3)}
        assert set(CoinPayChannel.desk.applied) == coin_numbers  # each applied once, through CoinPay only
        assert sorted(n for kind, n in CoinPayChannel.desk.calls if kind == "apply") == sorted(coin_numbers)
        assert {req.refund_amount for req in CoinPayChannel.desk.applied.values()} == {1004, 1005, 1006}
        assert set(emulator.snapshot()["refunds_created"]) == wechat_numbers  # WeChat never saw a CoinPay refund

        # The order of a channel nobody here serves: accepted and cancelled, its refund opened on its
        # channel and never sent anywhere, no attempt spent; nothing else waited for it.
        stray = refund_rows[7]
        assert stray["channel"] == "nopay" and stray["submit_sent"] == 0 and stray["attempts"] == 0
        assert (stray["submit_scanned"], stray["submit_success"]) == (0, 0)
        assert stray["out_refund_no"] not in CoinPayChannel.desk.applied
        assert stray["out_refund_no"] not in emulator.snapshot()["refunds_created"]
