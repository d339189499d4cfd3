"""`initdb` creates the schema on SQLite and MariaDB, and is safe to run twice."""

from __future__ import annotations

from sqlalchemy import inspect

from cancel_scanner.engine.db import init_schema, make_engine
from tests.flow import TABLES


def test_initdb_twice_leaves_the_five_tables(db_url):
    engine = make_engine(db_url)
    try:
        first = init_schema(engine)
        second = init_schema(engine)
        assert set(TABLES) <= set(first)
        assert first == second
        assert set(TABLES) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
