"""One bad row costs only itself, in every stage.

Given ten rows ready for a stage, one of them bad in the way real shops make rows bad (a trigger that
refuses a change of that order, a constraint it would break, an oplog event someone else already
wrote), when the stage runs one batch, then the nine good rows are done in that same pass and the bad
row alone is affected: its attempt counted, a reason a person can read (never driver text), a backoff,
and, after its attempts, 1/0 for a person; or, where the conflict is harmless (the event is already
in the oplog), it is done too. For a gateway stage, what WeChat did for the bad row is kept on a table
of ours, and no number is called twice at once.

SQLite and MariaDB (triggers on both: SIGNAL on MariaDB, RAISE on SQLite); the constraint cases use
MariaDB's CHECK constraints, which SQLite cannot add to a table that exists, except intake's, a refund
number already taken, which is the same on both.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from cancel_scanner.engine.status import collect_status
from cancel_scanner.scanners import build_stages
from tests.flow import T0, row, rows, scalar
from testsupport import shop
from testsupport.bad_rows import BAD, CASES, Case, drop_shop_trigger, orders_ready_for, shop_trigger
from testsupport.logs import log_lines

ORDERS = list(range(1, 11))  # BAD (5) among them
GOOD = len(ORDERS) - 1
SHOP_RULE = "order locked by after-sales"
DRIVER_TEXT = ("Error", "pymysql", "sqlite3", "(1644", "(4025", "SQLSTATE", "INSERT", "UPDATE ")


def given_ten_orders_ready_for(world, case: Case) -> dict[int, int]:
    runner = world.runner()
    try:
        return orders_ready_for(world.db, world.emulator, runner, world.clock, case.stage, ORDERS)
    finally:
        runner.close()


def flags(db, case: Case, row_id: int) -> dict[str, Any]:
    f, r = (f"{case.flag}_" if case.flag else ""), (f"{case.retry}_" if case.retry else "")
    got = row(db, case.table, row_id)
    return {
        "scanned": got[f"{f}scanned"],
        "success": got[f"{f}success"],
        "attempts": got[f"{r}attempts"],
        "last_error": got[f"{r}last_error"],
    }


def facts(db) -> list[dict[str, Any]]:
    return [
        dict(r) for r in rows(db, "SELECT stage, row_id, fact, number, detail, reason, resolved_at FROM channel_fact")
    ]


def run_one_batch(world, case: Case):
    runner = world.runner()
    try:
        return runner.run_stage(case.stage, world.clock.now)
    finally:
        runner.close()


def assert_good_rows_done(world, case: Case, ids: dict[int, int]) -> None:
    for order_id, row_id in ids.items():
        if order_id != BAD:
            got = flags(world.db, case, row_id)
            assert (got["scanned"], got["success"]) == (1, 1), (order_id, got)


def assert_readable(reason: str) -> None:
    assert reason.startswith("SHOP_REFUSED: ") and "the shop's database refused" in reason
    assert not any(fragment in reason for fragment in DRIVER_TEXT), reason


def assert_wechat_called_each_number_once_at_a_time(world, case: Case) -> None:
    if case.stage in ("submit_refund", "poll_refund"):
        assert max(world.emulator.max_in_flight.values()) == 1
        assert sorted(world.emulator.refunds_created.values()) == [1] * len(ORDERS)
    if case.stage == "close_unpaid":
        assert all(count == 1 for count in world.emulator.closed_trades.values())


@pytest.mark.parametrize("stage", list(CASES))
def test_a_row_a_shop_trigger_refuses_fails_alone_and_the_others_are_done_in_the_same_pass(world, stage):
    case = CASES[stage]
    ids = given_ten_orders_ready_for(world, case)
    shop_trigger(world.db, *case.trigger, message=SHOP_RULE)

    report = run_one_batch(world, case)

    assert (report.done, report.retried, report.error) == (GOOD, 1, None)
    assert_good_rows_done(world, case, ids)
    bad = flags(world.db, case, ids[BAD])
    assert (bad["scanned"], bad["success"], bad["attempts"]) == (0, 0, 1)
    assert_readable(bad["last_error"])
    assert SHOP_RULE in bad["last_error"]  # the shop's own words for its rule
    assert_wechat_called_each_number_once_at_a_time(world, case)
    kept = facts(world.db)
    if case.fact is None:
        assert kept == []
    else:
        # What WeChat did is never lost: on a table of ours, and in the row's reason.
        assert [(k["stage"], k["row_id"], k["fact"], k["resolved_at"]) for k in kept] == [
            (stage, ids[BAD], case.fact, None)
        ]
        assert "not recorded here yet" in bad["last_error"]


def test_what_a_batch_tried_several_times_logs_is_logged_once_and_only_for_what_it_wrote(world, logs):
    """The search tries parts of the batch again: each refund's "accepted" is one event, and the bad
    row's acceptance is logged as kept, not as recorded."""
    case = CASES["submit_refund"]
    given_ten_orders_ready_for(world, case)
    logs.clear()
    shop_trigger(world.db, *case.trigger, message=SHOP_RULE)

    run_one_batch(world, case)

    accepted = [line for line in logs if "refund accepted by WeChat Pay" in line and line.startswith("INFO")]
    assert len(accepted) == GOOD
    assert len([line for line in logs if "kept in channel_fact" in line]) == 1
    assert len([line for line in logs if "will retry: SHOP_REFUSED" in line]) == 1


GOODS_MOVES = {"restore_stock": ("stock", +2), "decrement_sales": ("sales", -2)}


@pytest.mark.parametrize("stage", [s for s in CASES if s not in GOODS_MOVES])
def test_an_oplog_event_someone_already_wrote_is_kept_and_the_row_is_done(world, stage):
    """Harmless: the oplog records, each stage's own guarded flag decides what happens once."""
    case = CASES[stage]
    ids = given_ten_orders_ready_for(world, case)
    if case.event is not None:
        with world.db.begin() as conn:
            conn.execute(
                text("INSERT INTO goods_order2_oplog (order_id, event, detail) VALUES (:o, :e, 'written by the shop')"),
                {"o": BAD, "e": case.event},
            )

    report = run_one_batch(world, case)

    assert (report.done, report.retried, report.failed) == (len(ORDERS), 0, 0)
    for order_id in ORDERS:
        assert (flags(world.db, case, ids[order_id])["scanned"], flags(world.db, case, ids[order_id])["success"]) == (
            1,
            1,
        )
    if case.event is not None:
        assert [
            r["detail"]
            for r in rows(
                world.db,
                "SELECT detail FROM goods_order2_oplog WHERE order_id = :o AND event = :e",
                o=BAD,
                e=case.event,
            )
        ] == ["written by the shop"]
        assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = :e", e=case.event) == len(ORDERS)
    assert facts(world.db) == []


@pytest.mark.parametrize("stage", list(GOODS_MOVES))
def test_a_goods_move_already_in_the_oplog_is_not_made_twice_and_is_left_for_a_person(world, stage):
    """Not harmless: STOCK_RESTORED already there may mean the stock came back already (someone else's
    tool, or this order's flags reset by hand), so its goods are not moved again."""
    case = CASES[stage]
    column, delta = GOODS_MOVES[stage]
    ids = given_ten_orders_ready_for(world, case)
    with world.db.begin() as conn:
        conn.execute(
            text("INSERT INTO goods_order2_oplog (order_id, event, detail) VALUES (:o, :e, 'written by the shop')"),
            {"o": BAD, "e": case.event},
        )

    report = run_one_batch(world, case)

    assert (report.done, report.failed) == (GOOD, 1)
    assert_good_rows_done(world, case, ids)
    bad = flags(world.db, case, ids[BAD])
    assert (bad["scanned"], bad["success"]) == (1, 0) and bad["last_error"].startswith("ALREADY_LOGGED: ")
    assert [row(world.db, "goods", i)[column] for i in ORDERS] == [10 if i == BAD else 10 + delta for i in ORDERS]
    assert (
        scalar(
            world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE order_id = :o AND event = :e", o=BAD, e=case.event
        )
        == 1
    )


@pytest.fixture
def mysql_world(mysql_db, mysql_url, sandbox):
    from tests.flow import World, test_config

    return World(db=mysql_db, config=test_config(mysql_url), sandbox=sandbox)


@pytest.mark.mysql
@pytest.mark.parametrize("stage", list(CASES))
def test_a_row_that_breaks_a_check_constraint_fails_alone(mysql_world, stage):
    world, case = mysql_world, CASES[stage]
    ids = given_ten_orders_ready_for(world, case)
    table, condition = case.check
    with world.db.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT shop_check CHECK ({condition})")

    report = run_one_batch(world, case)

    assert (report.done, report.retried) == (GOOD, 1)
    assert_good_rows_done(world, case, ids)
    bad = flags(world.db, case, ids[BAD])
    assert (bad["scanned"], bad["success"], bad["attempts"]) == (0, 0, 1)
    assert_readable(bad["last_error"])
    assert "CHECK constraint" in bad["last_error"]
    assert [k["fact"] for k in facts(world.db)] == ([case.fact] if case.fact else [])


def test_a_refund_number_already_taken_fails_only_its_request(world):
    """intake's constraint on both databases: a leftover refund row (a restored backup) holds order 5's number."""
    case = CASES["intake"]
    ids = given_ten_orders_ready_for(world, case)
    with world.db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, refund_seq, out_refund_no, out_trade_no, refund_amount,"
                " total_amount, next_attempt_at) VALUES (999, 1, :no, 'SO9999999999', 1, 1, :t)"
            ),
            {"no": f"CSR{BAD}-1", "t": T0},
        )

    report = run_one_batch(world, case)

    assert (report.done, report.retried) == (GOOD, 1)
    assert_good_rows_done(world, case, ids)
    bad = flags(world.db, case, ids[BAD])
    assert_readable(bad["last_error"])
    assert "a unique key" in bad["last_error"]
    assert row(world.db, "goods_order2", BAD)["order_status"] == "PAID"  # nothing of it half-done


@pytest.mark.parametrize("stage", ["intake", "close_unpaid", "restore_stock"])
def test_a_bad_row_spends_its_attempts_and_ends_for_a_person_with_a_reason_a_merchant_can_read(world, stage):
    case = CASES[stage]
    ids = given_ten_orders_ready_for(world, case)
    shop_trigger(world.db, *case.trigger, message=SHOP_RULE)
    runner = world.runner()
    try:
        for _ in range(40):
            runner.run_stage(stage, world.clock.now)
            if flags(world.db, case, ids[BAD])["scanned"]:
                break
            world.clock.advance(900)
    finally:
        runner.close()
    bad = flags(world.db, case, ids[BAD])
    assert (bad["scanned"], bad["success"]) == (1, 0)
    assert_readable(bad["last_error"])
    assert "gave up after" in bad["last_error"]
    status = collect_status(world.db, build_stages(world.config), world.clock.now)
    assert {s.stage: s.failed for s in status.stages if s.failed} == {
        stage: 1
    }  # `status`, the page, the rows_failed alert
    if world.db.dialect.name != "sqlite":  # the DBA's view (MariaDB only)
        failed = rows(world.db, "SELECT stage, row_id FROM v_cancel_scanner_failed")
        assert [(f["stage"], f["row_id"]) for f in failed] == [(stage, ids[BAD])]
    if stage == "intake":
        request = row(world.db, "req_order_ops", ids[BAD])
        assert request["result_code"] == "SHOP_REFUSED"
        assert SHOP_RULE in request["result_msg"] and not any(f in request["result_msg"] for f in DRIVER_TEXT)
        assert not request["result_msg"].startswith("SHOP_REFUSED")
    if stage == "close_unpaid":
        # Closed at WeChat, the order still unpaid here: kept for a person, in our table and the row's reason.
        assert world.emulator.trade_state(shop.order_row(BAD)["no"]) == "CLOSED"
        assert "trade closed at WeChat Pay" in bad["last_error"]
        assert [k["fact"] for k in facts(world.db) if k["resolved_at"] is None] == ["PAYMENT_CLOSED"]


def test_a_refund_wechat_accepted_never_ends_as_refused_and_is_recorded_once_the_shop_lets_it(world):
    case = CASES["submit_refund"]
    ids = given_ten_orders_ready_for(world, case)
    shop_trigger(world.db, *case.trigger, message=SHOP_RULE)
    runner = world.runner()
    try:
        for _ in range(30):  # more than the stage's 20 attempts
            runner.run_stage(case.stage, world.clock.now)
            world.clock.advance(30)
        bad = flags(world.db, case, ids[BAD])
        assert (bad["scanned"], bad["success"]) == (0, 0) and bad["attempts"] > 20  # still pending, never "refused"
        assert "accepted by WeChat Pay" in bad["last_error"]
        assert sorted(world.emulator.refunds_created.values()) == [1] * len(
            ORDERS
        )  # the same number each time: one refund
        assert max(world.emulator.max_in_flight.values()) == 1

        drop_shop_trigger(world.db)  # the shop lifts its rule
        world.clock.advance(600)
        runner.run_stage(case.stage, world.clock.now)
    finally:
        runner.close()
    bad = flags(world.db, case, ids[BAD])
    assert (bad["scanned"], bad["success"], bad["last_error"]) == (1, 1, None)
    assert row(world.db, "refund_order", ids[BAD])["wx_refund_id"]
    assert [(k["fact"], k["resolved_at"] is not None) for k in facts(world.db)] == [("REFUND_ACCEPTED", True)]
    assert sorted(world.emulator.refunds_created.values()) == [1] * len(ORDERS)


@pytest.fixture
def logs():
    """Every log record of the test, with its traceback if any, as the daemon's sink would write it."""
    with log_lines("{level} {message} {exception}") as lines:
        yield lines


BAD_NUMBERS = ["SO 000005", "订单000005", "SO.000005", "SO/000005", "SO?000005", "SO5"]


def with_order_no(world, order_id: int, order_no: str) -> None:
    with world.db.begin() as conn:
        conn.execute(text("UPDATE goods_order2 SET order_no = :no WHERE id = :id"), {"no": order_no, "id": order_id})


@pytest.mark.parametrize("order_no", BAD_NUMBERS)
def test_a_request_for_an_order_whose_number_wechat_would_refuse_is_answered_bad_order_no_and_nothing_is_sent(
    world, order_no
):
    runner = world.runner()
    try:
        shop.insert_goods_rows(world.db, [shop.goods_row(1)])
        shop.insert_orders(world.db, [shop.order_row(i, paid=i % 2 == 0, now=T0) for i in (1, 2, 3, 4)])
        for i in (1, 2):
            with_order_no(world, i, f"{order_no}{i}" if len(order_no) > 3 else order_no[:2] + str(i))
        world.emulator.create_trade(shop.order_row(3)["no"], 1280)
        shop.insert_requests(world.db, [(i, "MERCHANT_CANCEL", "clerk-1", None) for i in (1, 2, 3, 4)])
        world.settle(runner)
    finally:
        runner.close()
    answers = {
        r["order_id"]: (r["result_code"], r["result_msg"])
        for r in rows(world.db, "SELECT order_id, result_code, result_msg FROM req_order_ops")
    }
    assert answers[1][0] == answers[2][0] == "BAD_ORDER_NO" and "nothing was sent to WeChat" in answers[1][1]
    assert answers[3][0] == answers[4][0] == "OK"
    assert [row(world.db, "goods_order2", i)["order_status"] for i in (1, 2, 3, 4)] == [
        "UNPAID",
        "PAID",
        "CANCELLED",
        "CANCELLED",
    ]
    assert set(world.emulator.refunds_created) == {"CSR4-1"}
    assert (
        world.emulator.payment_counts["queries"] == 2 and world.emulator.payment_counts["closes"] == 1
    )  # order 3 only


@pytest.mark.parametrize("order_no", ["SO 000007", "订单00007", "SO?000007"])
def test_an_unpaid_order_or_a_refund_with_a_number_wechat_would_refuse_ends_for_a_person_without_a_call(
    world, order_no, logs
):
    """Rows that reach the gateway stages without intake (a timeout; a refund row from before this check)."""
    from datetime import timedelta

    shop.insert_goods_rows(world.db, [shop.goods_row(1)])
    shop.insert_orders(
        world.db,
        [
            shop.order_row(7, paid=False, now=T0, created_at=T0 - timedelta(hours=2)),
            shop.order_row(8, paid=True, now=T0),
        ],
    )
    with_order_no(world, 7, order_no)
    with world.db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, refund_seq, out_refund_no, out_trade_no, refund_amount,"
                " total_amount, next_attempt_at) VALUES (8, 1, 'CSR8-1', :no, 1280, 1280, :t)"
            ),
            {"no": order_no, "t": T0},
        )
    runner = world.runner()
    try:
        for stage in ("close_unpaid", "submit_refund"):
            report = runner.run_stage(stage, world.clock.now)
            assert (report.failed, report.retried) == (1, 0), stage
    finally:
        runner.close()
    order, refund = row(world.db, "goods_order2", 7), row(world.db, "refund_order", 1)
    assert (order["close_scanned"], order["close_success"], order["order_status"]) == (1, 0, "UNPAID")
    assert order["close_last_error"].startswith("BAD_ORDER_NO: ") and "never sent" in order["close_last_error"]
    assert (refund["submit_scanned"], refund["submit_success"], refund["submit_sent"]) == (1, 0, 1)
    assert refund["last_error"].startswith("BAD_ORDER_NO: ")
    assert world.emulator.payment_counts["queries"] == 0 and not world.emulator.refunds_created
    assert not [line for line in logs if "Traceback" in line]  # an expected refusal, not a bug


def test_a_bug_on_one_request_keeps_it_pending_never_answers_the_merchant_with_it_and_the_others_are_done(
    world, monkeypatch, logs
):
    from cancel_scanner.scanners.intake import Intake

    judge = Intake._judge

    def buggy(req, order, now, *rest):
        if order.id == BAD:
            raise KeyError("a bug the tests put here")
        return judge(req, order, now, *rest)

    monkeypatch.setattr(Intake, "_judge", staticmethod(buggy))
    ids = given_ten_orders_ready_for(world, CASES["intake"])
    runner = world.runner()
    try:
        for _ in range(12):  # past intake's 8 attempts
            runner.run_stage("intake", world.clock.now)
            world.clock.advance(900)
    finally:
        runner.close()
    bad = row(world.db, "req_order_ops", ids[BAD])
    assert (bad["scanned"], bad["success"], bad["result_code"], bad["result_msg"]) == (0, 0, None, None)
    assert bad["attempts"] > 8 and bad["last_error"].startswith(
        "INTERNAL_ERROR: unexpected KeyError (see the daemon's log)"
    )
    assert all(row(world.db, "req_order_ops", ids[i])["result_code"] == "OK" for i in ORDERS if i != BAD)
    assert any("Traceback" in line and "a bug the tests put here" in line for line in logs)  # for whoever fixes it
