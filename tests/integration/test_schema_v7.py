"""Schema version 7: every order and refund names its payment channel (goods_order2.channel,
refund_order.channel and its archive), 'wechat' for every row from before channels existed."""

from __future__ import annotations

from sqlalchemy import inspect

from tests.flow import add_goods, add_order, rows
from testsupport.migrations import mark_schema_version, migrate_from

CHANNEL_COLUMNS = (("goods_order2", "channel"), ("refund_order", "channel"), ("refund_order_archive", "channel"))


def test_a_version_6_database_gets_the_channel_columns_from_migrate_with_wechat_on_every_existing_row(db):
    add_goods(db, 1)
    add_order(db, 1)
    with db.begin() as conn:
        for table, column in CHANNEL_COLUMNS:
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        mark_schema_version(conn, 6)
    migrate_from(db, 6)
    for table, column in CHANNEL_COLUMNS:
        assert column in {c["name"] for c in inspect(db).get_columns(table)}, table
    assert rows(db, "SELECT channel FROM goods_order2 WHERE id = 1") == [{"channel": "wechat"}]
