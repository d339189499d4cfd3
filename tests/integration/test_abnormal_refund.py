"""abnormal-refund: a refund WeChat reports ABNORMAL sent on to a bank card, then followed to SUCCESS.

Every test runs on SQLite and MariaDB, against the emulator over real HTTP with real signatures
(and, for a user's card, real RSA-OAEP encryption the emulator opens with its platform key). The
emulator keeps nothing of the bank details: a test sees them only through its on_bank_details hook.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from cancel_scanner.engine.runner import Hooks
from cancel_scanner.gateway.contract import Accepted, Permanent, Secret
from cancel_scanner.gateway.keys import generate_key_material
from cancel_scanner.gateway.sandbox import client_for
from cancel_scanner.models import metadata
from cancel_scanner.operations.abnormal import (
    BUSY,
    MAYBE_APPLIED,
    Applied,
    BankCard,
    Refused,
    Undecided,
    apply_abnormal_refund,
    check_request,
)
from tests.flow import add_goods, add_order, refunds, request_cancel, row, rows
from testsupport.logs import log_lines

ACCOUNT = "6222020200112233445"
HOLDER = "李小龙"
MERCHANT, USER = "MERCHANT_BANK_CARD", "USER_BANK_CARD"


def card(bank_type: str = "ICBC_DEBIT", account: str = ACCOUNT, name: str = HOLDER) -> BankCard:
    return BankCard(bank_type, Secret(account), Secret(name))


def abnormal(world, order_id: int) -> dict[str, Any]:
    """Given a paid order cancelled by the merchant, when WeChat reports its refund ABNORMAL (the user's
    card is frozen), then the row waits for the merchant's action: pending, ABNORMAL."""
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, order_id, quantity=2)
    request_cancel(world.db, order_id)
    world.emulator.abnormal_for(f"SO{order_id:010d}")
    runner = world.runner()
    try:
        runner.run_until_idle(world.clock.now)  # intake, submit
        world.clock.advance(1)
        runner.run_until_idle(world.clock.now)  # the first poll: ABNORMAL
    finally:
        runner.close()
    refund = refunds(world.db)[order_id]
    assert (refund["wx_status"], refund["progress_scanned"], refund["lease_owner"]) == ("ABNORMAL", 0, None)
    return refund


def send(
    world,
    row_id: int,
    *,
    to: str = MERCHANT,
    bank_card: BankCard | None = None,
    gateway: Any = None,
    busy_wait_seconds: float = 0,
    **options: Any,
):
    return apply_abnormal_refund(
        world.db,
        gateway or world.sandbox.gateway,
        row_id,
        to=to,
        card=bank_card,
        by="ops-lee",
        clock=world.clock,
        lease_seconds=world.config.job("poll_refund").lease_seconds,
        busy_wait_seconds=busy_wait_seconds,
        **options,
    )


def applies(world) -> dict:
    return world.emulator.snapshot()["abnormal_applies"]


def events(world, order_id: int) -> dict[str, str | None]:
    return {
        r["event"]: r["detail"]
        for r in rows(
            world.db, "SELECT event, detail FROM goods_order2_oplog WHERE order_id = :o ORDER BY id", o=order_id
        )
    }


def every_row_as_text(db) -> str:
    with db.connect() as conn:
        return "\n".join(
            repr(tuple(r)) for t in metadata.sorted_tables for r in conn.execute(text(f"SELECT * FROM {t.name}"))
        )


@pytest.fixture
def captured_logs():
    """Every log record of the test, message and bound fields, at DEBUG."""
    with log_lines("{message} {extra} {exception}") as lines:
        yield lines


# -- the way through -------------------------------------------------------------------------------


def test_to_the_merchants_bank_card_the_refund_goes_on_to_success_through_the_normal_poll(world):
    refund = abnormal(world, 401)

    result = send(world, refund["id"])

    assert result == Applied(refund["id"], refund["out_refund_no"], MERCHANT, "PROCESSING")
    after = refunds(world.db)[401]
    assert (after["wx_status"], after["last_error"], after["lease_owner"], after["lease_until"]) == (
        "PROCESSING",
        None,
        None,
        None,
    )
    assert after["next_attempt_at"] == world.clock.now  # the daemon polls it at once
    assert applies(world) == {(refund["out_refund_no"], MERCHANT): 1}
    assert events(world, 401)["ABNORMAL_REFUND_APPLIED"].startswith("MERCHANT_BANK_CARD by ops-lee")

    world.settle()

    order = row(world.db, "goods_order2", 401)
    assert (order["refund_status"], order["stock_scanned"], order["sales_scanned"]) == ("REFUNDED", 1, 1)
    assert (row(world.db, "goods", 1)["stock"], row(world.db, "goods", 1)["sales"]) == (12, 3)
    final = refunds(world.db)[401]
    assert (final["wx_status"], final["progress_success"], final["sync_success"]) == ("SUCCESS", 1, 1)
    assert world.emulator.recorded(refund["out_refund_no"]).status == "SUCCESS"
    assert world.emulator.snapshot()["refunds_created"] == {refund["out_refund_no"]: 1}
    assert world.emulator.snapshot()["fen_refunded"] == {"SO0000000401": 1280}
    assert list(events(world, 401)) == [
        "CANCELLED",
        "REFUND_SUBMITTED",
        "ABNORMAL_REFUND_APPLIED",
        "REFUND_SUCCEEDED",
        "STOCK_RESTORED",
        "SALES_DECREMENTED",
    ]


def test_a_users_bank_card_reaches_wechat_encrypted_and_is_kept_nowhere(world, captured_logs):
    refund = abnormal(world, 402)
    opened: list[tuple] = []
    # What the emulator decrypted, compared here and kept as yes or no: never the text.
    world.emulator.on_bank_details = lambda number, bank_type, account, name: opened.append(
        (number, bank_type, account == ACCOUNT, name == HOLDER)
    )
    details = card()

    result = send(world, refund["id"], to=USER, bank_card=details)
    world.settle()

    assert isinstance(result, Applied) and result.to == USER
    assert opened == [(refund["out_refund_no"], "ICBC_DEBIT", True, True)]
    assert applies(world) == {(refund["out_refund_no"], USER): 1}
    assert row(world.db, "goods_order2", 402)["refund_status"] == "REFUNDED"
    shown = " ".join(
        [
            repr(details),
            str(details),
            repr(result),
            "\n".join(captured_logs),
            every_row_as_text(world.db),
            repr(world.emulator.logged_requests()),
            repr(world.emulator.snapshot()),
        ]
    )
    assert "ICBC_DEBIT" in repr(details)
    for secret in (ACCOUNT, HOLDER):
        assert secret not in shown
    assert any("abnormal refund applied" in line for line in captured_logs)


# -- refusals: nothing sent ----------------------------------------------------------------------------


def test_refusals_name_the_reason_and_send_nothing(world):
    refund = abnormal(world, 403)
    add_order(world.db, 404)
    request_cancel(world.db, 404)
    world.emulator.success_delay = 3600  # 404's refund stays PROCESSING
    runner = world.runner()
    try:
        runner.run_until_idle(world.clock.now)
    finally:
        runner.close()
    processing = refunds(world.db)[404]
    world.emulator.forget_requests()

    assert send(world, 999_999).code == "REFUND_NOT_FOUND"
    not_abnormal = send(world, processing["id"])
    assert (not_abnormal.code, processing["out_refund_no"] in not_abnormal.message) == ("NOT_ABNORMAL", True)
    assert send(world, refund["id"], to=USER).code == "BANK_DETAILS_MISSING"
    assert send(world, refund["id"], to=USER, bank_card=card(bank_type="")).code == "BAD_BANK_TYPE"
    assert send(world, refund["id"], to=USER, bank_card=card(account="6222 0202 0011")).code == "BAD_ACCOUNT_NUMBER"
    assert send(world, refund["id"], bank_card=card()).code == "BANK_DETAILS_NOT_WANTED"
    assert send(world, refund["id"], to="ALIPAY").code == "BAD_TYPE"
    assert world.emulator.logged_requests() == []  # not one call reached WeChat

    assert isinstance(send(world, refund["id"]), Applied)
    second = send(world, refund["id"])  # the row is PROCESSING now: refused before WeChat is asked
    assert isinstance(second, Refused) and second.code == "NOT_ABNORMAL"
    assert applies(world) == {(refund["out_refund_no"], MERCHANT): 1}


def test_no_refusal_message_shows_a_bank_detail():
    for account, name in ((ACCOUNT, ""), ("12ab" + ACCOUNT, HOLDER), (ACCOUNT, "x" * 65), (ACCOUNT, "a\x00b")):
        code, message = check_request(USER, card(account=account, name=name))
        assert code in ("BAD_ACCOUNT_NUMBER", "BAD_HOLDER_NAME")
        assert ACCOUNT not in message and HOLDER not in message


def test_the_gateway_refuses_a_malformed_abnormal_refund_without_naming_the_details(world):
    gateway = world.sandbox.gateway
    for kwargs in (
        {"to": USER, "bank_account": ACCOUNT, "real_name": HOLDER},  # no bank_type
        {"to": USER, "bank_type": "ICBC_DEBIT", "bank_account": ACCOUNT},  # no name
        {"to": MERCHANT, "bank_type": "ICBC_DEBIT", "bank_account": ACCOUNT, "real_name": HOLDER},
        {"to": USER, "bank_type": "ICBC_DEBIT", "bank_account": ACCOUNT * 20, "real_name": HOLDER},
    ):
        with pytest.raises(ValueError) as refused:
            gateway.abnormal_refund("5000000001", "CSR1-1", **kwargs)
        assert ACCOUNT not in str(refused.value) and HOLDER not in str(refused.value)
    with pytest.raises(ValueError):
        gateway.abnormal_refund("50/../1", "CSR1-1", to=MERCHANT)  # a refund_id goes into a signed path
    assert world.emulator.logged_requests() == []


def test_wechat_answers_a_second_apply_invalid_request_and_undecryptable_details_param_error(world):
    refund = abnormal(world, 405)
    number, refund_id = refund["out_refund_no"], refund["wx_refund_id"]
    gateway = world.sandbox.gateway

    first = gateway.abnormal_refund(refund_id, number, to=MERCHANT)
    second = gateway.abnormal_refund(refund_id, number, to=MERCHANT)

    assert isinstance(first, Accepted) and (first.refund.status, first.refund.channel) == (
        "PROCESSING",
        "OTHER_BANKCARD",
    )
    assert isinstance(second, Permanent) and second.code == "INVALID_REQUEST" and "not ABNORMAL" in second.message
    assert applies(world) == {(number, MERCHANT): 1}

    # Encrypted under another key than the platform's: the emulator cannot open them, and says so.
    stranger = generate_key_material()
    keys = world.sandbox.keys
    wrong_key = client_for(
        keys, world.emulator.base_url, timeout=(2, 2), platform_public_key_pem=stranger.platform_public_key_pem
    )
    try:
        world.emulator.force_status(number, "ABNORMAL")
        refused = wrong_key.abnormal_refund(
            refund_id, number, to=USER, bank_type="ICBC_DEBIT", bank_account=ACCOUNT, real_name=HOLDER
        )
    finally:
        wrong_key.close()
    assert isinstance(refused, Permanent) and refused.code == "PARAM_ERROR" and "decrypt" in refused.message
    assert (
        gateway.abnormal_refund("50" + "0" * 30, number, to=MERCHANT).code == "RESOURCE_NOT_EXISTS"
    )  # another refund_id


# -- the lease: never two calls for one refund at once --------------------------------------------------


def test_while_the_daemon_queries_the_refund_the_apply_is_refused_and_sends_nothing(world):
    refund = abnormal(world, 406)
    world.clock.advance(3600)  # due for its next poll
    during: list = []

    def while_the_daemon_holds_the_row(stage, leased_row, result):
        if stage == "poll_refund":
            during.append(send(world, leased_row.id))

    daemon = world.runner(hooks=Hooks(after_gateway_call=while_the_daemon_holds_the_row))
    try:
        report = daemon.run_stage("poll_refund", world.clock.now)
    finally:
        daemon.close()

    assert report.claimed == 1
    assert [(r.code, refund["out_refund_no"] in r.message) for r in during] == [(BUSY, True)]
    assert applies(world) == {}
    assert isinstance(send(world, refund["id"]), Applied)  # once the daemon let go


def test_a_busy_row_is_waited_for_a_while(world):
    refund = abnormal(world, 407)
    with world.db.begin() as conn:
        conn.execute(
            text("UPDATE refund_order SET lease_owner = 'daemon-x', lease_until = :until WHERE id = :id"),
            {"until": datetime(2100, 1, 1), "id": refund["id"]},
        )
    naps: list[float] = []

    def the_daemon_finishes_meanwhile(seconds: float) -> None:
        naps.append(seconds)
        with world.db.begin() as conn:
            conn.execute(
                text("UPDATE refund_order SET lease_owner = NULL, lease_until = NULL WHERE id = :id"),
                {"id": refund["id"]},
            )

    result = send(world, refund["id"], busy_wait_seconds=5, sleep=the_daemon_finishes_meanwhile)

    assert isinstance(result, Applied) and len(naps) == 1


def test_while_the_apply_holds_the_row_the_daemon_does_not_claim_it(world):
    refund = abnormal(world, 408)
    world.clock.advance(3600)  # due for its next poll
    daemon = world.runner()

    class DaemonPollsDuringTheCall:
        def __init__(self, inner):
            self.inner, self.claimed = inner, None

        def abnormal_refund(self, *args, **kwargs):
            self.claimed = daemon.run_stage("poll_refund", world.clock.now).claimed
            return self.inner.abnormal_refund(*args, **kwargs)

    gateway = DaemonPollsDuringTheCall(world.sandbox.gateway)
    try:
        result = send(world, refund["id"], gateway=gateway)
    finally:
        daemon.close()

    assert isinstance(result, Applied)
    assert gateway.claimed == 0
    assert world.emulator.snapshot()["max_in_flight"][refund["out_refund_no"]] == 1


# -- an unknown outcome ----------------------------------------------------------------------------


def test_a_timeout_leaves_the_row_abnormal_with_a_note_and_the_next_poll_tells(world):
    refund = abnormal(world, 409)
    number = refund["out_refund_no"]
    impatient = client_for(world.sandbox.keys, world.emulator.base_url, timeout=(0.3, 0.3))
    # WeChat takes the apply, but its answer comes after the client has given up.
    world.emulator.fail_next(number, "slow", call="any", after_commit=True, slow_seconds=1.0)
    try:
        result = send(world, refund["id"], gateway=impatient)
    finally:
        impatient.close()

    assert isinstance(result, Undecided) and result.code == MAYBE_APPLIED
    after = refunds(world.db)[409]
    assert after["wx_status"] == "ABNORMAL" and after["lease_owner"] is None
    assert after["last_error"].startswith(MAYBE_APPLIED) and "may have received it" in after["last_error"]
    assert after["next_attempt_at"] == world.clock.now  # the next poll tells
    assert applies(world) == {(number, MERCHANT): 1}  # it did arrive
    assert "ABNORMAL_REFUND_APPLIED" not in events(world, 409)
    assert world.emulator.wait_for(lambda: world.emulator.in_flight(number) == 0, timeout=5)

    repeated = send(world, refund["id"])  # an operator who repeats without checking: WeChat says no
    assert isinstance(repeated, Refused) and repeated.code == "WECHAT_REFUSED" and "INVALID_REQUEST" in repeated.message

    world.settle()
    assert row(world.db, "goods_order2", 409)["refund_status"] == "REFUNDED"
    assert applies(world) == {(number, MERCHANT): 1}
    assert world.emulator.snapshot()["fen_refunded"] == {"SO0000000409": 1280}
