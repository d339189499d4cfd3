"""Whatever collation the shop chose (issue 24, item 1), on MariaDB.

Given a shop whose goods and goods_order2 were created in one of the collations shops have (MariaDB's
default for utf8mb4, unicode, binary, legacy utf8, the newer UCA ones), with the shop's columns only
and a few thousand orders, when `migrate` adopts it, then it runs to the end (the views included: they
failed with 1271 "Illegal mix of collations" before), says the schema is current, our tables and
columns take the shop's collation (one rule: the shop's goods_order2, over utf8mb4), the flow refunds
and closes old orders, reconcile matches a bill, and `status` and the status page read the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate
from cancel_scanner.engine.db import make_engine
from cancel_scanner.engine.status import collect_status, format_status
from cancel_scanner.monitoring.page import PageView, render
from cancel_scanner.monitoring.snapshot import Snapshot, listings
from cancel_scanner.operations.bill import Bill, BillPayment, BillRefund
from cancel_scanner.operations.reconcile import reconcile_day
from cancel_scanner.scanners import build_stages
from tests.flow import Clock, World, test_config

pytestmark = pytest.mark.mysql
ORDERS = 3_000
# (the shop's collation, what ours become)
COLLATIONS = [
    ("utf8mb4_general_ci", "utf8mb4_general_ci"),  # MariaDB's default for utf8mb4: the most common case
    ("utf8mb4_unicode_ci", "utf8mb4_unicode_ci"),
    ("utf8mb4_bin", "utf8mb4_bin"),
    ("utf8mb3_general_ci", "utf8mb4_general_ci"),  # legacy `utf8`
    ("utf8mb3_unicode_ci", "utf8mb4_unicode_ci"),
    ("utf8mb4_unicode_520_ci", "utf8mb4_unicode_520_ci"),
    ("utf8mb4_uca1400_ai_ci", "utf8mb4_uca1400_ai_ci"),  # MariaDB 10.10+ (its answer to MySQL 8's utf8mb4_0900_ai_ci)
]


def shop_in(url: str, collation: str) -> None:
    charset = collation.split("_", 1)[0]
    table = f"ENGINE=InnoDB DEFAULT CHARSET={charset} COLLATE={collation}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE goods (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64) NOT NULL,"
                f" stock INT UNSIGNED NOT NULL DEFAULT 0, sales INT UNSIGNED NOT NULL DEFAULT 0) {table}"
            )
        )
        conn.execute(
            text(
                "CREATE TABLE goods_order2 (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, order_no VARCHAR(64) NOT NULL,"
                " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, goods_id BIGINT NOT NULL, quantity INT UNSIGNED NOT NULL,"
                " total_amount INT UNSIGNED NOT NULL, pay_status TINYINT NOT NULL DEFAULT 0, transaction_id VARCHAR(32) NULL,"
                " paid_at DATETIME NULL, order_status VARCHAR(16) NOT NULL DEFAULT 'UNPAID', is_deleted TINYINT NOT NULL DEFAULT 0,"
                f" created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE KEY shop_order_no (order_no)) {table}"
            )
        )
        conn.execute(text("INSERT INTO goods (id, name, stock, sales) VALUES (1, '茶叶', 500, 40), (2, 'cup', 80, 9)"))
        conn.execute(
            text(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount, pay_status,"
                " transaction_id, paid_at, order_status, created_at)"
                " SELECT seq, CONCAT('SO', LPAD(seq, 10, '0')), seq % 977, 7, 1 + seq % 2, 1, 100 + seq % 50, IF(seq % 3 = 0, 0, 1),"
                " IF(seq % 3 = 0, NULL, CONCAT('4200', LPAD(seq, 24, '0'))), IF(seq % 3 = 0, NULL, NOW() - INTERVAL 1 HOUR),"
                " IF(seq % 3 = 0, 'UNPAID', 'PAID'), IF(seq IN (3, 4), NOW() - INTERVAL 1 HOUR, NOW())"  # the others: not timed out
                f" FROM seq_1_to_{ORDERS}"
            )
        )
    engine.dispose()


@pytest.mark.parametrize("shop, ours", COLLATIONS, ids=[c for c, _ in COLLATIONS])
def test_a_shop_in_this_collation_is_adopted_and_the_flow_reconcile_status_and_page_work(
    mysql_url, sandbox, shop, ours
):
    shop_in(mysql_url, shop)
    db = make_engine(mysql_url)
    try:
        migrate.apply(db, migration_plan(db))
        assert schema_problem(db) is None and migration_plan(db).steps == []  # `migrate --check`: current
        with db.connect() as conn:
            collations = dict(
                conn.execute(
                    text(
                        "SELECT TABLE_NAME, TABLE_COLLATION FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
                        " AND TABLE_TYPE = 'BASE TABLE'"
                    )
                ).all()
            )
            mixed = conn.execute(
                text(
                    "SELECT TABLE_NAME, COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
                    " AND TABLE_NAME NOT IN ('goods', 'goods_order2') AND TABLE_NAME NOT LIKE 'v\\_%'"  # the views' literals are the session's
                    " AND COLLATION_NAME IS NOT NULL AND COLLATION_NAME <> :ours"
                ),
                {"ours": ours},
            ).all()
        assert collations["goods_order2"] == shop and collations["refund_order"] == ours and mixed == [], mixed

        # The flow on two old orders: 4 was paid (refunded), 3 was not (closed, cancelled).
        with db.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES"
                    " (4, 'MERCHANT_CANCEL', 'clerk', '缺货'), (3, 'USER_CANCEL', NULL, NULL)"
                )
            )
        sandbox.emulator.register_payment("SO0000000004", 104, "4200" + "4".zfill(24))
        sandbox.emulator.create_trade("SO0000000003", 103)
        clock = Clock(now=datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10))
        world = World(db=db, config=test_config(mysql_url), sandbox=sandbox, clock=clock)
        world.settle()
        with db.connect() as conn:
            orders = dict(
                conn.execute(
                    text("SELECT id, CONCAT(order_status, '/', refund_status) FROM goods_order2 WHERE id IN (3, 4)")
                ).all()
            )
            refund = conn.execute(
                text("SELECT out_refund_no, out_trade_no, refund_amount, wx_status FROM refund_order")
            ).one()
        assert orders == {3: "CANCELLED/NONE", 4: "CANCELLED/REFUNDED"}

        # reconcile matches a bill naming the refund and the payment; status and the page read it all.
        day = (clock.now + timedelta(hours=8)).date()
        at = datetime.now(UTC)
        bill = Bill(
            bill_date=day,
            rows=2,
            refunds=(
                BillRefund(refund.out_trade_no, refund.out_refund_no, refund.refund_amount, "SUCCESS", "5030", "", at),
            ),
            payments=(BillPayment("SO0000000004", "4200" + "4".zfill(24), 104, "SUCCESS", at),),
        )
        result = reconcile_day(
            db, lambda d: bill if d == day else Bill(bill_date=d, refunds=(), payments=(), rows=0), day, now=clock.now
        )
        assert (result.state, result.diffs) == ("CLEAN", ())
        stages = build_stages(world.config)
        status = collect_status(db, stages, clock.now)
        assert "intake" in format_status(status)
        with db.connect() as conn:
            page = render(
                PageView(
                    snapshot=Snapshot(status=status, listings=listings(conn, stages)),
                    refresh_seconds=5,
                    host="h",
                    now=0.0,
                )
            )
        assert "<!doctype html>" in page
        with db.connect() as conn:  # the DBA's view, a UNION of shop and our strings: 1271 before
            assert conn.execute(text("SELECT COUNT(*) FROM v_cancel_scanner_failed")).scalar() == 0
    finally:
        db.dispose()


def test_a_half_adopted_database_whose_tables_took_another_collation_is_finished(mysql_url, sandbox):
    """An earlier migrate created our tables in utf8mb4_unicode_ci beside a utf8mb4_general_ci shop and
    stopped at the views (1271): migrate converts our tables (never the shop's) and finishes."""
    shop_in(mysql_url, "utf8mb4_general_ci")
    db = make_engine(mysql_url)
    try:
        # What the old migrate did: our tables as schema.sql writes them, then the view failed.
        with db.begin() as conn:
            for table in migrate.parse_schema(migrate.schema_sql())[0]:
                if table.name in ("req_order_ops", "refund_order", "goods_order2_oplog"):
                    conn.exec_driver_sql(table.create)
        the_plan = migration_plan(db)
        converted = [step.what.split()[1] for step in the_plan.steps if step.what.startswith("convert ")]
        assert sorted(converted) == ["goods_order2_oplog", "refund_order", "req_order_ops"]  # ours; never the shop's
        migrate.apply(db, the_plan)
        assert schema_problem(db) is None and migration_plan(db).steps == []
        with db.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM v_cancel_scanner_failed")).scalar() == 0
            assert (
                conn.execute(
                    text(
                        "SELECT TABLE_COLLATION FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
                        " AND TABLE_NAME = 'goods_order2'"
                    )
                ).scalar()
                == "utf8mb4_general_ci"
            )
    finally:
        db.dispose()
