"""sql/schema.sql (what DBAs run) and models/ (what the code uses) describe the same tables."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.dialects import mysql

from cancel_scanner import models
from cancel_scanner.engine.db import init_schema, schema_sql, split_sql

pytestmark = pytest.mark.mysql
_INT_WIDTH = re.compile(r"\b(TINYINT|SMALLINT|INT|INTEGER|BIGINT)\(\d+\)")


def _type(t) -> str:
    return _INT_WIDTH.sub(r"\1", t.compile(dialect=mysql.dialect())).replace("INTEGER", "INT")


def _model_shape():
    shape = {}
    dialect = mysql.dialect()
    for table in models.metadata.sorted_tables:
        shape[table.name] = {
            "columns": {c.name: (_type(c.type.dialect_impl(dialect)), c.nullable) for c in table.columns},
            "unique": {
                u.name: tuple(c.name for c in u.columns)
                for u in table.constraints
                if u.__class__.__name__ == "UniqueConstraint"
            },
            "indexes": {i.name: tuple(c.name for c in i.columns) for i in table.indexes},
        }
    return shape


def _database_shape(engine):
    insp = inspect(engine)
    shape = {}
    for name in insp.get_table_names():
        indexes = insp.get_indexes(name)
        shape[name] = {
            "columns": {c["name"]: (_type(c["type"]), c["nullable"]) for c in insp.get_columns(name)},
            "unique": {i["name"]: tuple(i["column_names"]) for i in indexes if i["unique"]},
            "indexes": {i["name"]: tuple(i["column_names"]) for i in indexes if not i["unique"]},
        }
    return shape


def test_schema_sql_and_models_agree_on_tables_columns_nullability_and_keys(mysql_db):
    database, model = _database_shape(mysql_db), _model_shape()
    assert sorted(database) == sorted(model)
    for table in model:
        for part in ("columns", "unique", "indexes"):
            assert database[table][part] == model[table][part], f"{table}.{part}: schema.sql != models"


def test_schema_sql_runs_twice_without_error(mysql_db):
    init_schema(mysql_db)
    init_schema(mysql_db)
    with mysql_db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM v_cancel_scanner_failed")).scalar() == 0


def test_a_merchant_row_with_four_columns_gets_the_contract_defaults(mysql_db):
    with mysql_db.begin() as conn:
        rid = conn.execute(
            text(
                "INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES (1, 'MERCHANT_CANCEL', 'm', 'r')"
            )
        ).lastrowid
        row = conn.execute(text("SELECT * FROM req_order_ops WHERE id = :id"), {"id": rid}).mappings().one()
    assert (row["scanned"], row["success"]) == (0, 0)
    assert row["result_code"] is None and row["result_msg"] is None and row["scanned_at"] is None
    assert row["attempts"] == 0 and row["next_attempt_at"] is None
    assert row["created_at"] is not None and row["updated_at"] is not None


def test_an_order_from_the_shop_gets_flags_zero_not_deleted_and_refund_status_none(mysql_db):
    with mysql_db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO goods_order2 (order_no, user_id, merchant_id, goods_id, quantity, total_amount, pay_status,"
                " order_status) VALUES ('SO1', 1, 2, 3, 1, 100, 1, 'PAID')"
            )
        )
        row = conn.execute(text("SELECT * FROM goods_order2 WHERE order_no = 'SO1'")).mappings().one()
    flags = ["wx_progress_scanned", "stock_scanned", "stock_success", "sales_scanned", "sales_success", "is_deleted"]
    assert [row[f] for f in flags] == [0] * len(flags)
    assert row["refund_status"] == "NONE"


def test_stock_can_never_go_negative(mysql_db):
    with mysql_db.begin() as conn:
        conn.execute(text("INSERT INTO goods (id, name, stock, sales) VALUES (1, 'g', 1, 0)"))
    with pytest.raises(Exception, match="(?i)out of range|constraint"), mysql_db.begin() as conn:
        conn.execute(text("UPDATE goods SET stock = stock - 2 WHERE id = 1"))


def test_every_statement_of_schema_sql_is_if_not_exists_or_or_replace():
    for stmt in split_sql(schema_sql()):
        assert "IF NOT EXISTS" in stmt or "OR REPLACE" in stmt or stmt.startswith("INSERT IGNORE"), stmt[:60]
