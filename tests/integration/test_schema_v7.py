"""Schema version 7: every order and refund names its payment channel (goods_order2.channel,
refund_order.channel and its archive), 'wechat' for every row from before channels existed."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.app import migration_plan, schema_problem
from cancel_scanner.engine import migrate
from tests.flow import add_goods, add_order, rows

CHANNEL_COLUMNS = (("goods_order2", "channel"), ("refund_order", "channel"), ("refund_order_archive", "channel"))


def test_a_version_6_database_gets_the_channel_columns_from_migrate_with_wechat_on_every_existing_row(db):
    add_goods(db, 1)
    add_order(db, 1)
    with db.begin() as conn:
        for table, column in CHANNEL_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.exec_driver_sql("DELETE FROM cancel_scanner_schema")
        conn.exec_driver_sql("INSERT INTO cancel_scanner_schema (version, applied_by) VALUES (6, 'test')")
    assert "behind" in str(schema_problem(db))

    the_plan = migration_plan(db)
    assert (the_plan.current, the_plan.head) == (6, migrate.head_version())
    migrate.apply(db, the_plan)

    assert schema_problem(db) is None and migration_plan(db).steps == []
    for table, column in CHANNEL_COLUMNS:
        assert column in {c["name"] for c in inspect(db).get_columns(table)}, table
    assert rows(db, "SELECT channel FROM goods_order2 WHERE id = 1") == [{"channel": "wechat"}]
