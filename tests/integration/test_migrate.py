"""`cancel-scanner migrate`: a shop's own database adopted, an older one upgraded, nothing lost.

Given a shop's goods and goods_order2 with only the shop's columns (100,000 orders), when the
DBA runs migrate, then the scanner's columns arrive with their defaults (every old order reads
"never touched"), a cancel of an old order is refunded with stock and sales right, and a second
migrate has nothing to do. A database at today's unversioned schema reaches head with every row
as it was; a shop column whose type cannot hold what the scanner writes refuses the whole
migration and changes nothing; a daemon on a schema behind or ahead of its own exits 2 with one
line. Migrating an empty database gives exactly what sql/schema.sql gives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from cancel_scanner import models
from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate
from cancel_scanner.engine.db import init_schema, make_engine, schema_sql
from cancel_scanner.models import metadata

REPO = Path(__file__).resolve().parents[2]
SHOP_ORDERS = 100_000

# What a shop that never ran cancel-scanner has: its goods, its orders, its own index names.
SHOP_DDL = (
    "CREATE TABLE goods (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL,"
    " stock INT UNSIGNED NOT NULL DEFAULT 0, sales INT UNSIGNED NOT NULL DEFAULT 0) ENGINE=InnoDB",
    "CREATE TABLE goods_order2 (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, order_no VARCHAR(64) NOT NULL,"
    " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, goods_id BIGINT NOT NULL, quantity {quantity} NOT NULL,"
    " total_amount INT UNSIGNED NOT NULL, pay_status TINYINT NOT NULL DEFAULT 0, transaction_id VARCHAR(32) NULL,"
    " paid_at DATETIME NULL, order_status VARCHAR(16) NOT NULL DEFAULT 'UNPAID', is_deleted TINYINT NOT NULL DEFAULT 0,"
    " created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE KEY shop_order_no (order_no), KEY shop_goods (goods_id))"
    " ENGINE=InnoDB",
)
SHOP_ROWS = (
    "INSERT INTO goods (id, name, stock, sales) VALUES (1, 'tea', 500, 40), (2, 'cup', 80, 9)",
    # Every third order unpaid; paid ones have WeChat's transaction id.
    "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount, pay_status,"
    " transaction_id, paid_at, order_status)"
    # Order numbers as WeChat Pay takes them (6 to 32 characters): SO0000000001, ...
    f" SELECT seq, CONCAT('SO', LPAD(seq, 10, '0')), seq % 977, 7, 1 + seq % 2, 1 + seq % 3, 100 + seq % 50, IF(seq % 3 = 0, 0, 1),"
    f" IF(seq % 3 = 0, NULL, CONCAT('4200', LPAD(seq, 24, '0'))), IF(seq % 3 = 0, NULL, NOW()), IF(seq % 3 = 0, 'UNPAID', 'PAID')"
    f" FROM seq_1_to_{SHOP_ORDERS}",
)


def shop_database(url: str, quantity: str = "INT UNSIGNED") -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for stmt in SHOP_DDL:
            conn.execute(text(stmt.format(quantity=quantity)))
        for stmt in SHOP_ROWS:
            conn.execute(text(stmt))
    engine.dispose()


def shape(engine) -> dict:
    """Everything a DBA would compare: columns with type, nullability, default, extra and comment;
    indexes with their columns; views; the recorded schema version."""
    with engine.connect() as conn:
        columns = conn.execute(
            text(
                "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA, COLUMN_COMMENT"
                " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, COLUMN_NAME"
            )
        ).all()
        indexes = conn.execute(
            text(
                "SELECT TABLE_NAME, INDEX_NAME, GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX), MIN(NON_UNIQUE)"
                " FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() GROUP BY TABLE_NAME, INDEX_NAME"
                " ORDER BY TABLE_NAME, INDEX_NAME"
            )
        ).all()
        version = migrate.current_version(conn)
    return {
        "columns": [tuple(c) for c in columns],
        "indexes": [tuple(i) for i in indexes],
        "views": sorted(inspect(engine).get_view_names()),
        "version": version,
    }


def checksums(engine, tables) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.exec_driver_sql(f"CHECKSUM TABLE {t}").one()[1] for t in tables}


def run_migrate(engine) -> migrate.Plan:
    the_plan = migration_plan(engine)
    migrate.apply(engine, the_plan)
    return the_plan


def errors(done: subprocess.CompletedProcess) -> list[str]:
    """stderr without the log lines (the sandbox logs where its emulator listens)."""
    return [line for line in done.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]


def scalar_of(engine, sql: str):
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def cli(args, url: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CANCEL_SCANNER_DB_URL": url, "CANCEL_SCANNER_ALLOW_SANDBOX": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cancel_scanner.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.mysql
def test_an_empty_database_migrated_to_head_is_exactly_sql_schema_sql(mysql_url, mysql_admin_url):
    fresh = make_engine(mysql_url)
    name = make_url(mysql_url).database + "_m"
    migrated_url = make_url(mysql_url).set(database=name).render_as_string(hide_password=False)
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    migrated = make_engine(migrated_url)
    try:
        init_schema(fresh)
        run_migrate(migrated)
        a, b = shape(fresh), shape(migrated)
        assert a["columns"] == b["columns"] and a["indexes"] == b["indexes"] and a["views"] == b["views"]
        assert a["version"] == b["version"] == migrate.head_version()
    finally:
        migrated.dispose()
        fresh.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{name}`")
        admin.dispose()


@pytest.mark.mysql
def test_a_shops_database_is_adopted_online_and_the_flow_runs_on_its_old_orders(mysql_url, sandbox):
    from datetime import datetime, timedelta

    from tests.flow import Clock, World, test_config

    shop_database(mysql_url)
    db = make_engine(mysql_url)
    try:
        the_plan = migration_plan(db)
        sql = "\n".join(migrate.render(the_plan))
        # Columns instantly (metadata only), indexes online; nothing that copies the table.
        assert (
            "ALTER TABLE goods_order2 ADD COLUMN" in sql
            and "ADD COLUMN refund_status VARCHAR(16) NOT NULL DEFAULT 'NONE'" in sql
        )
        assert "ALGORITHM=INSTANT" in sql and "ALGORITHM=INPLACE, LOCK=NONE" in sql and "COPY" not in sql
        assert "DROP" not in sql.upper().replace("DROP DATABASE", "")
        assert "uk_goods_order2_order_no" not in sql  # the shop's own unique key on order_no serves
        migrate.apply(db, the_plan)

        untouched = scalar_of(
            db,
            "SELECT COUNT(*) FROM goods_order2 WHERE refund_status = 'NONE' AND stock_scanned = 0 AND stock_success = 0"
            " AND sales_scanned = 0 AND sales_success = 0 AND wx_progress_scanned = 0 AND stock_attempts = 0",
        )
        assert untouched == SHOP_ORDERS
        assert scalar_of(db, "SELECT COUNT(*) FROM goods_order2") == SHOP_ORDERS
        with db.connect() as conn:  # goods gained columns and kept its rows
            assert [tuple(r) for r in conn.execute(text("SELECT id, stock, sales FROM goods ORDER BY id"))] == [
                (1, 500, 40),
                (2, 80, 9),
            ]
        assert schema_problem(db) is None

        twice = migration_plan(db)
        assert twice.steps == [] and not twice.behind
        with db.begin() as conn:  # a DBA dropped an index by mistake: migrate puts it back, same version
            conn.execute(text("ALTER TABLE goods_order2 DROP INDEX idx_goods_order2_sales_pending"))
        assert [s.what for s in run_migrate(db).steps][0].startswith("add 1 index(es) to goods_order2")
        assert schema_problem(db) is None

        # A merchant cancels two old orders: order 4 was paid (goods 1, quantity 2), order 3 never was.
        with db.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES"
                    " (4, 'MERCHANT_CANCEL', 'clerk', 'customer asked'), (3, 'USER_CANCEL', NULL, NULL)"
                )
            )
        # The shop's orders were placed just now (the server's NOW()); the flow looks at them ten minutes later.
        later = Clock(now=datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10))
        World(db=db, config=test_config(mysql_url), sandbox=sandbox, clock=later).settle()
        with db.connect() as conn:
            orders = {r.id: r for r in conn.execute(text("SELECT * FROM goods_order2 WHERE id IN (3, 4)"))}
            goods = dict(conn.execute(text("SELECT id, CONCAT(stock, '/', sales) FROM goods")).all())
            refunds = conn.execute(text("SELECT order_id, wx_status, refund_amount FROM refund_order")).all()
        assert (orders[4].order_status, orders[4].refund_status, orders[4].stock_success, orders[4].sales_success) == (
            "CANCELLED",
            "REFUNDED",
            1,
            1,
        )
        assert (orders[3].order_status, orders[3].refund_status, orders[3].stock_success) == ("CANCELLED", "NONE", 1)
        assert [tuple(r) for r in refunds] == [(4, "SUCCESS", 104)]
        # goods 1: order 4 (quantity 2) back in stock and out of sales; goods 2: order 3 (quantity 1) restocked.
        assert goods == {1: "502/38", 2: "81/9"}
    finally:
        db.dispose()


@pytest.mark.mysql
def test_todays_unversioned_schema_reaches_head_with_every_row_as_it_was(mysql_db, tmp_path):
    with mysql_db.begin() as conn:
        conn.execute(text("INSERT INTO goods (id, name, stock, sales) VALUES (1, 'g', 5, 5)"))
        conn.execute(
            text(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount)"
                " VALUES (1, 'SO1', 1, 1, 1, 1, 100)"
            )
        )
        conn.execute(text("INSERT INTO req_order_ops (order_id, op_type) VALUES (1, 'MERCHANT_CANCEL')"))
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, out_refund_no, out_trade_no, refund_amount, total_amount)"
                " VALUES (1, 'R1', 'SO1', 100, 100)"
            )
        )
        conn.execute(text("INSERT INTO goods_order2_oplog (order_id, event) VALUES (1, 'CANCELLED')"))
        conn.execute(
            text(
                "INSERT INTO cancel_scanner_process (owner, hostname, pid, started_at, heartbeat_at)"
                " VALUES ('o', 'h', 1, NOW(3), NOW(3))"
            )
        )
        conn.execute(text("DROP TABLE cancel_scanner_schema"))  # today's schema has no version table
    tables = [t for t in metadata.tables if t != "cancel_scanner_schema"]
    before = checksums(mysql_db, tables)
    assert "no version" in str(schema_problem(mysql_db))

    the_plan = run_migrate(mysql_db)
    assert "create table cancel_scanner_schema" in [s.what for s in the_plan.steps]
    assert checksums(mysql_db, tables) == before
    assert schema_problem(mysql_db) is None and migration_plan(mysql_db).steps == []


def test_an_older_scanners_database_is_upgraded_and_refunds_that_may_have_reached_wechat_stay_marked(db_url):
    """Before the process registry there was no submit_sent: a pending refund with attempts may have
    reached WeChat, and must be marked so, or a later refusal would be believed without a query."""
    db = make_engine(db_url)
    try:
        init_schema(db)
        with db.begin() as conn:
            for rid, attempts in ((1, 2), (2, 0)):
                conn.execute(
                    text(
                        "INSERT INTO refund_order (id, order_id, out_refund_no, out_trade_no, refund_amount, total_amount,"
                        " attempts) VALUES (:id, :id, :no, 'SO', 100, 100, :a)"
                    ),
                    {"id": rid, "no": f"R{rid}", "a": attempts},
                )
            conn.execute(
                text("DROP VIEW IF EXISTS v_cancel_scanner_failed") if db.dialect.name != "sqlite" else text("SELECT 1")
            )
            if db.dialect.name == "sqlite":
                conn.execute(text("DROP INDEX idx_refund_order_lease_owner"))
            else:
                conn.execute(text("ALTER TABLE refund_order DROP INDEX idx_refund_order_lease_owner"))
            conn.execute(text("ALTER TABLE refund_order DROP COLUMN submit_sent"))
            conn.execute(text("DROP TABLE cancel_scanner_process"))
            conn.execute(text("DROP TABLE cancel_scanner_schema"))
        the_plan = run_migrate(db)
        done = [s.what for s in the_plan.steps]
        assert any("submit_sent" in w and "backfill" in w for w in done), done
        with db.connect() as conn:
            marked = dict(conn.execute(text("SELECT id, submit_sent FROM refund_order ORDER BY id")).all())
        assert marked == {1: 1, 2: 0}
        assert "idx_refund_order_lease_owner" in {i["name"] for i in inspect(db).get_indexes("refund_order")}
        assert schema_problem(db) is None and migration_plan(db).steps == []
    finally:
        db.dispose()


@pytest.mark.mysql
def test_a_shop_column_too_narrow_for_the_scanner_refuses_and_changes_nothing(mysql_url):
    shop_database(mysql_url, quantity="VARCHAR(10)")
    db = make_engine(mysql_url)
    try:
        before = shape(db)
        with pytest.raises(
            migrate.SchemaRefused,
            match=r"goods_order2\.quantity is varchar\(10\); cancel-scanner reads or writes INT UNSIGNED there",
        ):
            migration_plan(db)
        assert shape(db) == before
    finally:
        db.dispose()


@pytest.mark.mysql
def test_the_cli_says_what_to_run_and_exits_2_on_a_schema_behind_or_ahead(mysql_url, tmp_path):
    shop_database(mysql_url)
    for command in (["run", "--once"], ["status"], ["initdb"]):
        out = cli(command, mysql_url, tmp_path)
        assert out.returncode == 2, (command, out.stderr)
        lines = errors(out)
        assert len(lines) == 1 and "cancel-scanner migrate" in lines[0] and "unavailable" not in lines[0], lines

    check = cli(["migrate", "--check"], mysql_url, tmp_path)
    assert check.returncode == 3 and "behind" in check.stdout
    review = cli(["migrate", "--sql"], mysql_url, tmp_path)
    assert review.returncode == 0 and "locks:" in review.stdout
    db = make_engine(mysql_url)
    try:
        assert "refund_status" not in {c["name"] for c in inspect(db).get_columns("goods_order2")}  # --sql ran nothing
        assert cli(["migrate"], mysql_url, tmp_path).returncode == 0
        assert cli(["migrate", "--check"], mysql_url, tmp_path).returncode == 0

        with db.begin() as conn:  # a newer cancel-scanner migrated this database further
            conn.execute(text("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (99, 'migrate 9.9')"))
        for command in (["run", "--once"], ["status"], ["migrate"]):
            out = cli(command, mysql_url, tmp_path)
            assert out.returncode == 2, (command, out.stderr)
            lines = errors(out)
            assert len(lines) == 1 and "version 99" in lines[0] and "upgrade cancel-scanner" in lines[0], lines
    finally:
        db.dispose()


@pytest.mark.mysql
def test_a_table_the_shop_keeps_busy_makes_migrate_wait_briefly_and_never_stall_the_shop(mysql_url):
    """An ALTER queued behind a long transaction would hold up every later shop query on the table:
    migrate waits at most LOCK_WAIT_SECONDS per try, lets the shop through in between, and gives up."""
    shop_database(mysql_url)
    db = make_engine(mysql_url)
    holder = create_engine(mysql_url)
    shop = create_engine(mysql_url)
    try:
        the_plan = migration_plan(db)
        held = holder.connect()
        held.begin()
        held.execute(text("SELECT COUNT(*) FROM goods_order2 WHERE id = 1"))  # an open transaction: its metadata lock
        failure: list[BaseException] = []
        tries: list[float] = []

        def migrating():
            try:
                migrate.apply(
                    db, the_plan, sleep=lambda s: tries.append(s) or time.sleep(0.2), lock_wait_seconds=1, tries=3
                )
            except Exception as exc:  # noqa: BLE001 - what the test asserts
                failure.append(exc)

        worker = threading.Thread(target=migrating)
        worker.start()
        slowest = 0.0
        with shop.connect() as conn:
            deadline = time.monotonic() + 60
            while worker.is_alive() and time.monotonic() < deadline:  # the shop's checkouts go on meanwhile
                started = time.monotonic()
                conn.execute(text("SELECT quantity FROM goods_order2 WHERE id = 2"))
                conn.commit()
                slowest = max(slowest, time.monotonic() - started)
        worker.join(5)
        held.close()
        assert failure and "Lock wait timeout" in str(failure[0]) and len(tries) == 2
        assert slowest < 1.0 + 0.5, f"a shop query waited {slowest:.2f} s behind the ALTER"
        assert run_migrate(db).steps  # the lock gone, the same migration goes through
        assert schema_problem(db) is None
    finally:
        for engine in (db, holder, shop):
            engine.dispose()


def test_sqlite_a_shops_tables_are_adopted_and_a_second_migrate_has_nothing_to_do(sqlite_url):
    db = make_engine(sqlite_url)
    try:
        with db.begin() as conn:
            stamps = (
                "created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,"
                " updated_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP"
            )  # SQLite cannot add these later
            conn.exec_driver_sql(
                "CREATE TABLE goods (id INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL,"
                f" stock INTEGER NOT NULL DEFAULT 0, sales INTEGER NOT NULL DEFAULT 0, {stamps})"
            )
            conn.exec_driver_sql(
                "CREATE TABLE goods_order2 (id INTEGER PRIMARY KEY, order_no VARCHAR(32) NOT NULL,"
                " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, goods_id BIGINT NOT NULL,"
                " quantity INTEGER NOT NULL, total_amount INTEGER NOT NULL, pay_status TINYINT NOT NULL DEFAULT 0,"
                f" order_status VARCHAR(16) NOT NULL DEFAULT 'UNPAID', is_deleted TINYINT NOT NULL DEFAULT 0, {stamps})"
            )
            conn.exec_driver_sql(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount)"
                " VALUES (1, 'SO1', 1, 1, 1, 1, 100)"
            )
        assert schema_problem(db).kind == "behind"
        run_migrate(db)
        columns = {c["name"] for c in inspect(db).get_columns("goods_order2")}
        assert {c.name for c in models.goods_order2.columns} <= columns
        assert set(metadata.tables) <= set(inspect(db).get_table_names())
        with db.connect() as conn:
            row = conn.execute(text("SELECT refund_status, stock_scanned, sales_attempts FROM goods_order2")).one()
        assert tuple(row) == ("NONE", 0, 0)
        assert schema_problem(db) is None and migration_plan(db).steps == []
    finally:
        db.dispose()


def test_every_table_of_schema_sql_is_read_with_the_models_columns_and_keys():
    tables, others = migrate.parse_schema(schema_sql())
    assert {t.name: [c.name for c in t.columns] for t in tables} == {
        t.name: [c.name for c in t.columns] for t in metadata.sorted_tables
    }
    assert [migrate._view_name(v) for v in others] == ["v_cancel_scanner_failed"]
    order_keys = {k.name: k.columns for t in tables if t.name == "refund_order" for k in t.keys if k.kind != "check"}
    assert order_keys["uk_refund_order_order_seq"] == ("order_id", "refund_seq")


@pytest.mark.parametrize(
    "found, wanted, holds",
    [
        ("bigint(20)", "BIGINT", True),
        ("int(11)", "BIGINT", False),
        ("bigint(20) unsigned", "INT UNSIGNED", True),
        ("int(11)", "INT UNSIGNED", False),  # a signed INT cannot hold every unsigned one
        ("bigint(20)", "INT UNSIGNED", True),
        ("varchar(64)", "VARCHAR(32)", True),
        ("varchar(16)", "VARCHAR(32)", False),
        ("text", "VARCHAR(255)", True),
        ("datetime", "DATETIME(3)", True),
        ("timestamp(6)", "DATETIME(3)", True),
        ("varchar(10)", "INT UNSIGNED", False),
        ("decimal(10,2)", "INT UNSIGNED", False),
    ],
)
def test_a_column_type_holds_what_the_scanner_writes_only_when_at_least_as_wide(found, wanted, holds):
    assert migrate.type_holds(found, wanted) is holds


def test_sqlite_refuses_a_column_it_cannot_add_and_changes_nothing(sqlite_url):
    db = make_engine(sqlite_url)
    try:
        with db.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE goods (id INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL,"
                " stock INTEGER NOT NULL DEFAULT 0, sales INTEGER NOT NULL DEFAULT 0)"
            )
        with pytest.raises(migrate.SchemaRefused, match=r"goods\.created_at is missing and SQLite cannot add it"):
            migration_plan(db)
        assert inspect(db).get_table_names() == ["goods"]
    finally:
        db.dispose()


# --- adversarial: what a shop's real database has, and what a DBA does with the plan -------------


def shop_with(url: str, *changes: str) -> None:
    """The shop's database, then the statements that make it this shop's."""
    shop_database(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        for stmt in changes:
            conn.execute(text(stmt))
    engine.dispose()


@pytest.mark.mysql
@pytest.mark.parametrize(
    "change, refusal",
    [
        # Its polls say is_deleted = 0: an order whose is_deleted is NULL would be cancelled but never restocked.
        ("ALTER TABLE goods_order2 MODIFY is_deleted TINYINT NULL DEFAULT 0", r"goods_order2\.is_deleted allows NULL"),
        # Our indexes cover order_status: a TEXT one cannot be indexed, and the ALTER would fail after the columns.
        (
            "ALTER TABLE goods_order2 MODIFY order_status TEXT NOT NULL",
            r"index idx_goods_order2_stock_pending cannot be built on order_status text",
        ),
        # A unique key of ours whose name the shop took for another key: order_no would not be unique.
        (
            "ALTER TABLE goods_order2 DROP INDEX shop_order_no, ADD UNIQUE KEY uk_goods_order2_order_no (order_no, merchant_id)",
            r"goods_order2\.uk_goods_order2_order_no is a unique key on \(order_no, merchant_id\); cancel-scanner needs it UNIQUE",
        ),
        # Two orders with one order_no: the unique key would fail half-way through.
        (
            "ALTER TABLE goods_order2 DROP INDEX shop_order_no, ADD INDEX shop_order_no (order_no)",
            None,
        ),  # no duplicates: adopted (below, with the unique key added)
        (
            "ALTER TABLE goods_order2 DROP INDEX shop_order_no, ADD INDEX shop_order_no (order_no);"
            " UPDATE goods_order2 SET order_no = 'SO0000000001' WHERE id = 2",
            r"goods_order2 has rows with the same \(order_no\), e\.g\. 'SO0000000001'",
        ),
        # A column the daemon writes, too narrow for what it writes ('CANCELLED' is 9 characters): named (issue 24).
        (
            "ALTER TABLE goods_order2 MODIFY order_status VARCHAR(8) NOT NULL DEFAULT 'UNPAID'",
            r"goods_order2\.order_status is varchar\(8\); cancel-scanner reads or writes VARCHAR\(16\) there",
        ),
        # A table of the shop's with our view's name: CREATE OR REPLACE VIEW would fail at the very end.
        ("CREATE TABLE v_cancel_scanner_failed (id INT PRIMARY KEY)", r"v_cancel_scanner_failed is a table"),
    ],
)
def test_a_shop_database_that_would_fail_half_way_is_refused_before_anything_runs(mysql_url, change, refusal):
    shop_with(mysql_url, *change.split("; "))
    db = make_engine(mysql_url)
    try:
        before = shape(db)
        if refusal is None:
            run_migrate(db)
            unique = {i["name"]: i["unique"] for i in inspect(db).get_indexes("goods_order2")}
            assert unique["uk_goods_order2_order_no"], "a plain index of the shop's on order_no is no unique key"
            return
        with pytest.raises(migrate.SchemaRefused, match=refusal):
            migration_plan(db)
        assert shape(db) == before
    finally:
        db.dispose()


@pytest.mark.mysql
def test_a_latin1_shop_table_gets_its_new_columns_in_utf8mb4_for_wechats_chinese_messages(mysql_url):
    shop_with(mysql_url, "ALTER TABLE goods_order2 CONVERT TO CHARACTER SET latin1")
    db = make_engine(mysql_url)
    try:
        sql = "\n".join(migrate.render(migration_plan(db)))
        assert "ALGORITHM=INSTANT" in sql and "CONVERT" not in sql  # the shop's own columns stay latin1
        run_migrate(db)
        with db.begin() as conn:
            conn.execute(text("UPDATE goods_order2 SET stock_last_error = 'ORDERPAID: 订单已支付' WHERE id = 1"))
            assert (
                conn.execute(text("SELECT stock_last_error FROM goods_order2 WHERE id = 1")).scalar()
                == "ORDERPAID: 订单已支付"
            )
        assert schema_problem(db) is None and migration_plan(db).steps == []
    finally:
        db.dispose()


@pytest.mark.mysql
def test_a_database_behind_gets_todays_view_even_when_no_table_needs_a_step(mysql_db):
    with mysql_db.begin() as conn:  # an older version: same tables, an older view
        conn.execute(text("CREATE OR REPLACE VIEW v_cancel_scanner_failed AS SELECT 'intake' AS stage"))
        conn.execute(text("DELETE FROM cancel_scanner_schema"))
        conn.execute(
            text("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (:v, 'schema.sql')"),
            {"v": migrate.head_version() - 1},
        )
    run_migrate(mysql_db)
    with mysql_db.connect() as conn:
        view = conn.execute(
            text("SELECT VIEW_DEFINITION FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE()")
        ).scalar()
    assert "submit_refund" in view and "restore_stock" in view
    assert schema_problem(mysql_db) is None


def _mdl_waiters(conn, statement_start: str) -> int:
    return conn.execute(
        text(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND INFO LIKE :s"
            " AND STATE LIKE 'Waiting for table metadata lock'"
        ),
        {"s": statement_start + "%"},
    ).scalar()


@pytest.mark.mysql
def test_two_migrates_at_once_both_end_at_head_and_nothing_runs_twice(mysql_url, tmp_path):
    """Both plan, both queue behind a shop transaction on goods: without one migrate at a time the
    second runs the same ALTER and fails on a duplicate column half-way."""
    shop_database(mysql_url)
    holder = create_engine(mysql_url)
    watch = create_engine(mysql_url)
    held = holder.connect()
    try:
        held.begin()
        held.execute(text("SELECT COUNT(*) FROM goods"))  # the shop's open transaction: its metadata lock
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CANCEL_SCANNER_DB_URL": mysql_url,
            "CANCEL_SCANNER_ALLOW_SANDBOX": "1",
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "cancel_scanner.cli", "migrate"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 20
        with watch.connect() as conn:  # one ALTER queued on the lock, the other migrate waiting its turn
            while time.monotonic() < deadline and not (
                _mdl_waiters(conn, "ALTER TABLE goods ") >= 1
                and conn.execute(
                    text("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT GET_LOCK%'")
                ).scalar()
                >= 1
            ):
                conn.rollback()
        held.rollback()
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert sum("nothing to do" in out for out, _ in outs) == 1, outs
        db = make_engine(mysql_url)
        assert schema_problem(db) is None and migration_plan(db).steps == []
        db.dispose()
    finally:
        held.close()
        holder.dispose()
        watch.dispose()


@pytest.mark.mysql
def test_what_migrate_sql_prints_runs_in_the_mysql_client_to_the_same_schema(mysql_url, mysql_admin_url, tmp_path):
    if not shutil.which("mysql"):
        pytest.skip("no mysql client")
    copy = make_url(mysql_url).database + "_dba"
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{copy}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    copy_url = make_url(mysql_url).set(database=copy).render_as_string(hide_password=False)
    by_migrate, by_dba = make_engine(mysql_url), make_engine(copy_url)
    try:
        for url in (mysql_url, copy_url):
            shop_database(url)
        review = cli(["migrate", "--sql"], copy_url, tmp_path)
        assert review.returncode == 0, review.stderr
        assert "SET SESSION lock_wait_timeout = 3;" in review.stdout.splitlines()[:6]  # before the first ALTER
        u = make_url(copy_url)
        pasted = subprocess.run(
            ["mysql", "-h", u.host, "-P", str(u.port), "-u", u.username, copy],
            input=review.stdout,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pasted.returncode == 0, pasted.stderr
        run_migrate(by_migrate)
        assert shape(by_dba) == shape(by_migrate)
        assert migration_plan(by_dba).steps == []
    finally:
        by_migrate.dispose()
        by_dba.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{copy}`")
        admin.dispose()


@pytest.mark.mysql
def test_a_user_without_alter_privilege_gets_one_line_and_a_later_migrate_finishes(
    mysql_url, mysql_admin_url, tmp_path
):
    shop_database(mysql_url)
    database = make_url(mysql_url).database
    user = f"u_{database[-8:]}"
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY 'pw'")
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, CREATE VIEW, INDEX ON `{database}`.* TO '{user}'@'%%'"
        )
    try:
        limited = make_url(mysql_url).set(username=user, password="pw").render_as_string(hide_password=False)
        out = cli(["migrate"], limited, tmp_path)
        lines = errors(out)
        assert out.returncode == 1 and len(lines) == 1 and "ALTER command denied" in lines[0], out.stderr
        assert cli(["migrate"], mysql_url, tmp_path).returncode == 0
        db = make_engine(mysql_url)
        assert schema_problem(db) is None and migration_plan(db).steps == []
        db.dispose()
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP USER '{user}'@'%%'")
        admin.dispose()


def test_comments_in_schema_sql_are_never_taken_for_the_columns_definition():
    script = (
        "CREATE TABLE IF NOT EXISTS t (\n"
        "  id BIGINT NOT NULL AUTO_INCREMENT,\n"
        "  a  VARCHAR(8) NULL COMMENT 'NOT NULL once set, DEFAULT none (see -- x), a, b',\n"
        "  b  INT NOT NULL DEFAULT 0, -- a trailing remark, with a comma\n"
        "  c  INT NOT NULL COMMENT 'it''s (DEFAULT 1)',\n"
        "  CONSTRAINT pk_t PRIMARY KEY (id), -- the key\n"
        "  INDEX idx_t_ab (a, b)\n"
        ") ENGINE=InnoDB;\n"
        "INSERT IGNORE INTO cancel_scanner_schema (version, applied_by) VALUES (1, 'schema.sql');\n"
    )
    (table,), _ = migrate.parse_schema(script)
    cols = {c.name: c for c in table.columns}
    assert cols["a"].definition == "VARCHAR(8) NULL COMMENT 'NOT NULL once set, DEFAULT none (see -- x), a, b'"
    assert not cols["a"].not_null and not cols["a"].needs_value
    assert cols["b"].definition == "INT NOT NULL DEFAULT 0"  # not ", -- a trailing ...": that would cut the ALTER short
    assert cols["c"].needs_value
    assert {k.name: k.columns for k in table.keys} == {"pk_t": ("id",), "idx_t_ab": ("a", "b")}


def test_every_key_and_column_type_of_schema_sql_is_the_models():
    tables, _ = migrate.parse_schema(schema_sql())
    for spec in tables:
        model = metadata.tables[spec.name]
        wanted = {i.name: tuple(c.name for c in i.columns) for i in model.indexes}
        wanted |= {
            c.name: tuple(col.name for col in c.columns)
            for c in model.constraints
            if c.name and hasattr(c, "columns") and len(c.columns)
        }
        assert {k.name: k.columns for k in spec.keys if k.kind != "check"} == {
            n: cols for n, cols in wanted.items() if not n.startswith("ck_")
        }, spec.name
        for column in spec.columns:
            assert column.not_null is not model.c[column.name].nullable, f"{spec.name}.{column.name}"


@pytest.mark.mysql
def test_a_backfill_that_fails_after_its_column_was_added_is_run_by_the_next_migrate(
    mysql_db, mysql_admin_url, tmp_path
):
    """The column is there but was never backfilled: the schema must stay behind and the next migrate
    must run the backfill, or a refund that may have reached WeChat reads "never sent" for good."""
    with mysql_db.begin() as conn:  # an older cancel-scanner's database, a pending refund that was tried twice
        conn.execute(
            text(
                "INSERT INTO refund_order (order_id, out_refund_no, out_trade_no, refund_amount, total_amount, attempts)"
                " VALUES (1, 'R1', 'SO1', 100, 100, 2)"
            )
        )
        conn.execute(text("ALTER TABLE refund_order DROP COLUMN submit_sent"))
        conn.execute(text("DROP TABLE cancel_scanner_schema"))
    url = mysql_db.url.render_as_string(hide_password=False)
    database, user = mysql_db.url.database, f"b_{mysql_db.url.database[-8:]}"
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:  # may ALTER, may not UPDATE refund_order
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY 'pw'")
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT, CREATE, CREATE VIEW, ALTER, INDEX ON `{database}`.* TO '{user}'@'%%'"
        )
    try:
        out = cli(
            ["migrate"], make_url(url).set(username=user, password="pw").render_as_string(hide_password=False), tmp_path
        )
        lines = errors(out)
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        assert "refund_order.submit_sent was added but not backfilled" in lines[0]
        assert "run `cancel-scanner migrate` again" in lines[0]
        assert schema_problem(mysql_db).kind == "behind"  # no daemon starts on it
        assert scalar_of(mysql_db, "SELECT submit_sent FROM refund_order WHERE out_refund_no = 'R1'") == 0
        again = cli(["migrate"], url, tmp_path)  # a user who may UPDATE
        assert again.returncode == 0, again.stderr
        assert scalar_of(mysql_db, "SELECT submit_sent FROM refund_order WHERE out_refund_no = 'R1'") == 1
        assert schema_problem(mysql_db) is None and migration_plan(mysql_db).steps == []
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP USER '{user}'@'%%'")
        admin.dispose()


@pytest.mark.mysql
def test_a_shop_column_the_daemon_never_touches_is_adopted_in_the_shops_own_type(mysql_url):
    """Issue 24, item 2: goods.name VARCHAR(64) (ours is wider) was refused, though nothing of ours reads it."""
    shop_with(
        mysql_url,
        "ALTER TABLE goods MODIFY name VARCHAR(64) NOT NULL",
        "ALTER TABLE goods_order2 MODIFY merchant_id INT NOT NULL",
    )
    db = make_engine(mysql_url)
    try:
        run_migrate(db)
        assert schema_problem(db) is None and migration_plan(db).steps == []
        types = {c["name"]: str(c["type"]).lower() for c in inspect(db).get_columns("goods")}
        assert types["name"].startswith("varchar(64)")
    finally:
        db.dispose()


@pytest.mark.mysql
def test_migrate_refuses_a_column_too_narrow_for_what_the_daemon_writes_on_one_line_and_changes_nothing(
    mysql_url, tmp_path
):
    from testsupport import processes

    shop_with(mysql_url, "ALTER TABLE goods_order2 MODIFY order_status VARCHAR(8) NOT NULL DEFAULT 'UNPAID'")
    db = make_engine(mysql_url)
    try:
        before = shape(db)
        config = processes.write_config(tmp_path / "jobs.yaml", {"database_url": mysql_url})
        done = processes.run_cli(
            ["migrate"], config=config, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}, cwd=tmp_path, timeout=120
        )
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "goods_order2.order_status is varchar(8)" in lines[0], lines
        assert shape(db) == before
    finally:
        db.dispose()
