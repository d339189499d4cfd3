"""The database's own troubles are not the rows' fault, a row the shop holds delays only its own goods,
and an order whose payment fields disagree is refused, never guessed. SQLite and MariaDB."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cancel_scanner.engine.db import init_schema, make_engine
from cancel_scanner.engine.runner import Runner
from cancel_scanner.scanners import build_stages
from tests.flow import T0, add_goods, add_order, request_cancel, row, rows, scalar, test_config


def runner_for(db, db_url, **jobs) -> Runner:
    config = test_config(db_url, jobs=jobs)
    return Runner(db, config, build_stages(config), None, clock=lambda: T0)


def cancelled_unpaid_orders(db, count: int, goods_of) -> None:
    """Unpaid orders already cancelled by intake: restore_stock's work, nothing else's."""
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount,"
                " pay_status, order_status, refund_status, cancelled_at) VALUES"
                " (:id, :no, 1, 1, :goods, 1, 100, 0, 'CANCELLED', 'NONE', :at)"
            ),
            [{"id": i, "no": f"SO{i:010d}", "goods": goods_of(i), "at": T0} for i in range(1, count + 1)],
        )


# --- 6. inconsistent payments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "pay_status, status, transaction_id, why",
    [
        (2, "PAID", "4200000000000000000001", "pay_status is neither 0 nor 1"),
        (0, "UNPAID", "4200000000000000000002", "unpaid but has a transaction id"),
        (0, "PAID", None, "order says PAID, pay_status says unpaid"),
        (1, "UNPAID", "4200000000000000000004", "pay_status says paid, order says UNPAID"),
    ],
)
def test_an_order_whose_payment_fields_disagree_is_refused_and_left_untouched(
    db, db_url, pay_status, status, transaction_id, why
):
    add_goods(db, 1, stock=10)
    add_order(db, 601, paid=pay_status == 1, status=status, transaction_id=transaction_id or False)
    with db.begin() as conn:
        conn.execute(text("UPDATE goods_order2 SET pay_status = :p WHERE id = 601"), {"p": pay_status})
    req = request_cancel(db, 601)

    runner_for(db, db_url).run_until_idle(T0)

    request = row(db, "req_order_ops", req)
    assert (request["scanned"], request["success"], request["result_code"]) == (1, 0, "INCONSISTENT_PAYMENT"), why
    assert "payment fields disagree" in request["result_msg"]
    order = row(db, "goods_order2", 601)
    assert (order["order_status"], order["refund_status"], order["stock_scanned"]) == (status, "NONE", 0)
    assert scalar(db, "SELECT COUNT(*) FROM refund_order") == 0
    assert row(db, "goods", 1)["stock"] == 10


# --- 9. environment faults -------------------------------------------------------------------------


def test_a_missing_table_blocks_the_stage_without_spending_any_rows_attempts(db, db_url):
    cancelled_unpaid_orders(db, 20, lambda i: 1)
    with db.begin() as conn:
        conn.execute(text("DROP TABLE goods"))  # an upgrade half done, a DBA's mistake

    report = runner_for(db, db_url).run_stage("restore_stock", T0)

    assert report.blocked and "goods" in report.blocked
    assert report.error is None and report.failed == 0
    left = rows(db, "SELECT stock_scanned, stock_success, stock_attempts, stock_last_error FROM goods_order2")
    assert {(r["stock_scanned"], r["stock_success"], r["stock_attempts"], r["stock_last_error"]) for r in left} == {
        (0, 0, 0, None)
    }


def test_a_read_only_sqlite_file_blocks_the_stage_and_no_row_fails(tmp_path):
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    db = make_engine(url)
    init_schema(db)
    add_goods(db, 1, stock=5)
    cancelled_unpaid_orders(db, 3, lambda i: 1)
    db.dispose()
    read_only = make_engine(f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true")

    report = runner_for(read_only, url).run_stage("restore_stock", T0)
    read_only.dispose()

    assert report.blocked and report.failed == 0
    db = make_engine(url)
    assert scalar(db, "SELECT MAX(stock_attempts) FROM goods_order2") == 0
    assert row(db, "goods", 1)["stock"] == 5
    db.dispose()


@pytest.mark.mysql
def test_a_revoked_privilege_blocks_the_stage_and_after_the_grant_every_row_completes(mysql_db, mysql_url):
    add_goods(mysql_db, 1, stock=0)
    cancelled_unpaid_orders(mysql_db, 30, lambda i: 1)
    url = make_url(mysql_url)
    user, password = f"cs_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
        conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{url.database}`.* TO '{user}'@'%'"))
        conn.execute(text(f"REVOKE UPDATE ON `{url.database}`.* FROM '{user}'@'%'"))
        conn.execute(text(f"GRANT UPDATE ON `{url.database}`.goods_order2 TO '{user}'@'%'"))
        conn.execute(text(f"GRANT UPDATE ON `{url.database}`.cancel_scanner_process TO '{user}'@'%'"))
    shop = make_engine(url.set(username=user, password=password).render_as_string(hide_password=False))
    try:
        runner = runner_for(shop, mysql_url)
        for _ in range(3):  # however often it tries, no row pays for the missing privilege
            report = runner.run_stage("restore_stock", T0)
            assert report.blocked and "UPDATE command denied" in report.blocked
        assert scalar(mysql_db, "SELECT MAX(stock_attempts) FROM goods_order2") == 0
        assert scalar(mysql_db, "SELECT COUNT(*) FROM goods_order2 WHERE stock_scanned = 1") == 0

        with admin.begin() as conn:
            conn.execute(text(f"GRANT UPDATE ON `{url.database}`.goods TO '{user}'@'%'"))
        shop.dispose()  # privileges are read per connection
        runner.run_until_idle(T0)
        assert scalar(mysql_db, "SELECT COUNT(*) FROM goods_order2 WHERE stock_scanned = 1 AND stock_success = 1") == 30
        assert row(mysql_db, "goods", 1)["stock"] == 30
    finally:
        shop.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
        admin.dispose()


# --- 5. hot goods rows -----------------------------------------------------------------------------


@pytest.mark.mysql
def test_a_goods_row_the_shop_keeps_locked_delays_only_its_own_orders(mysql_db, mysql_url):
    """500 cancelled orders, 50 of them for goods 1, which the shop holds FOR UPDATE meanwhile."""
    for goods_id in range(1, 11):
        add_goods(mysql_db, goods_id, stock=0)
    cancelled_unpaid_orders(mysql_db, 500, lambda i: 1 + i % 10)
    holding = threading.Event()
    release = threading.Event()

    def shop_holds_goods_1() -> None:
        with mysql_db.connect() as conn, conn.begin():
            conn.execute(text("SELECT stock FROM goods WHERE id = 1 FOR UPDATE"))
            holding.set()
            release.wait(30)

    shop = threading.Thread(target=shop_holds_goods_1)
    shop.start()
    try:
        assert holding.wait(10)
        runner = runner_for(mysql_db, mysql_url, restore_stock={"batch_size": 500})
        started = time.monotonic()
        report = runner.run_stage("restore_stock", T0)
        took = time.monotonic() - started

        assert (report.done, report.later) == (450, 50)
        assert took < 4.5, f"the batch waited {took:.1f}s on a row it could not lock"  # lock wait timeout is 5 s
        busy = rows(
            mysql_db,
            "SELECT goods_id, stock_scanned, stock_attempts, stock_last_error FROM goods_order2 WHERE goods_id = 1",
        )
        assert {(r["stock_scanned"], r["stock_attempts"]) for r in busy} == {(0, 0)}
        assert all(r["stock_last_error"].startswith("GOODS_BUSY") for r in busy)
        stock = {r["id"]: r["stock"] for r in rows(mysql_db, "SELECT id, stock FROM goods")}
        assert stock == {1: 0, **{g: 50 for g in range(2, 11)}}

        # While the daemon works, a checkout on a goods nobody else holds never waits on it.
        with mysql_db.connect() as conn, conn.begin():
            started = time.monotonic()
            conn.execute(text("UPDATE goods SET stock = stock - 1 WHERE id = 2"))
            assert time.monotonic() - started < 1
    finally:
        release.set()
        shop.join(10)

    runner.run_until_idle(T0.replace(second=5))
    assert row(mysql_db, "goods", 1)["stock"] == 50
    assert scalar(mysql_db, "SELECT COUNT(*) FROM goods_order2 WHERE stock_success = 1") == 500


# --- 10. the DBA view --------------------------------------------------------------------------------


@pytest.mark.mysql
def test_the_failed_view_gives_each_row_its_own_reason(mysql_db, mysql_url):
    with mysql_db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO refund_order (id, order_id, out_refund_no, out_trade_no, refund_amount, total_amount,"
                " submit_scanned, submit_success, progress_scanned, progress_success, wx_status, last_error, sync_scanned, sync_success)"
                " VALUES"
                " (1, 11, 'CSR11-1', 'SO11', 100, 100, 1, 0, 0, 0, NULL, 'OUTCOME_UNKNOWN: check by hand', 0, 0),"
                " (2, 12, 'CSR12-1', 'SO12', 100, 100, 1, 1, 1, 0, 'PROCESSING', 'RESOURCE_NOT_EXISTS: gave up', 0, 0),"
                " (3, 13, 'CSR13-1', 'SO13', 100, 100, 1, 1, 1, 0, 'CLOSED', NULL, 1, 1),"
                " (4, 14, 'CSR14-1', 'SO14', 100, 100, 1, 1, 1, 0, 'SUCCESS', 'CONFLICTING_ANSWERS: SUCCESS then CLOSED', 0, 0)"
            )
        )
    reasons = {(r["stage"], r["row_id"]): r["reason"] for r in rows(mysql_db, "SELECT * FROM v_cancel_scanner_failed")}
    assert reasons == {
        ("submit_refund", 1): "OUTCOME_UNKNOWN: check by hand",
        ("poll_refund", 2): "RESOURCE_NOT_EXISTS: gave up",
        ("poll_refund", 3): "REFUND_CLOSED: WeChat closed refund CSR13-1; no money moved",
        ("poll_refund", 4): "CONFLICTING_ANSWERS: SUCCESS then CLOSED",
    }


@pytest.mark.mysql
def test_goods_rows_are_locked_only_at_the_end_and_a_row_taken_meanwhile_sends_its_orders_round_again(
    mysql_db, mysql_url
):
    """While restore_stock works out its batch the shop can still lock a goods row at once; when it
    does, that goods' orders are answered Later and the batch is done again without them."""
    from cancel_scanner.scanners.restore_stock import RestoreStock

    add_goods(mysql_db, 1, stock=0)
    add_goods(mysql_db, 2, stock=0)
    cancelled_unpaid_orders(mysql_db, 40, lambda i: 1 + i % 2)
    shop_holds = threading.Event()
    release = threading.Event()
    waited: list[float] = []

    def shop_takes_goods_2() -> None:
        with mysql_db.connect() as conn, conn.begin():
            started = time.monotonic()
            conn.execute(text("SELECT stock FROM goods WHERE id = 2 FOR UPDATE"))
            waited.append(time.monotonic() - started)
            shop_holds.set()
            release.wait(30)

    class ShopArrivesMidBatch(RestoreStock):
        def process(self, conn, rows, now):
            outcomes = super().process(conn, rows, now)
            if not shop_holds.is_set():
                threading.Thread(target=shop_takes_goods_2, daemon=True).start()
                assert shop_holds.wait(3), "the shop waited for a goods row the daemon should not hold yet"
            return outcomes

    config = test_config(mysql_url)
    runner = Runner(mysql_db, config, {"restore_stock": ShopArrivesMidBatch()}, None, clock=lambda: T0)
    try:
        report = runner.run_stage("restore_stock", T0)
    finally:
        release.set()

    assert waited and waited[0] < 1
    assert (report.done, report.later, report.failed) == (20, 20, 0)
    stock = {r["id"]: r["stock"] for r in rows(mysql_db, "SELECT id, stock FROM goods")}
    assert stock == {1: 20, 2: 0}
    assert scalar(mysql_db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = 'STOCK_RESTORED'") == 20
    busy = rows(mysql_db, "SELECT stock_scanned, stock_attempts, stock_last_error FROM goods_order2 WHERE goods_id = 2")
    assert all(
        (r["stock_scanned"], r["stock_attempts"]) == (0, 0) and r["stock_last_error"].startswith("GOODS_BUSY")
        for r in busy
    )
