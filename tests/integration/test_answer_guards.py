"""An answer from the gateway that names another refund or amount is never written as progress."""

from __future__ import annotations

from sqlalchemy import select

from cancel_scanner.engine.db import init_schema, make_engine
from cancel_scanner.engine.outcome import Failed
from cancel_scanner.engine.runner import Runner
from cancel_scanner.gateway.contract import Accepted, Refund
from cancel_scanner.models import refund_order
from cancel_scanner.scanners import build_stages
from cancel_scanner.scanners.poll_refund import PollRefund
from cancel_scanner.scanners.submit_refund import Attempt, SubmitRefund
from tests.flow import T0, add_goods, add_order, request_cancel, test_config


def _refund(amount: int, status: str) -> Refund:
    return Refund(
        refund_id="50000000000000000000000000001",
        out_refund_no="CSR501-1",
        out_trade_no="SO0000000501",
        transaction_id="",
        status=status,
        success_time=T0 if status == "SUCCESS" else None,
        create_time=T0,
        refund_amount=amount,
        total_amount=1280,
        user_received_account="",
        channel="ORIGINAL",
    )


def test_an_answer_with_another_amount_fails_the_row_instead_of_recording_it(sqlite_url):
    db = make_engine(sqlite_url)
    init_schema(db)
    add_goods(db, 1)
    add_order(db, 501, amount=1280)
    request_cancel(db, 501)
    config = test_config(sqlite_url)
    Runner(db, config, build_stages(config), None).run_stage("intake", T0)
    with db.begin() as conn:
        row = conn.execute(select(refund_order)).one()
        submitted = SubmitRefund(1).apply(
            conn, [(row, Attempt(Accepted(_refund(99, "PROCESSING")), earlier=False))], T0
        )
        polled = PollRefund((1,)).apply(conn, [(row, Accepted(_refund(99, "SUCCESS")))], T0)
        after = conn.execute(select(refund_order)).one()
    assert submitted[row.id] == polled[row.id]
    assert isinstance(polled[row.id], Failed) and polled[row.id].code == "MISMATCHED_ANSWER"
    assert (after.wx_status, after.success_time, after.wx_refund_id) == (None, None, None)
    db.dispose()
