"""IntCase: the per-row integer deltas of one UPDATE, written into the statement, integers only."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text, update

from cancel_scanner.engine.sql import IntCase
from cancel_scanner.models import goods


def test_each_row_gets_its_own_delta_and_the_others_none():
    engine = create_engine("sqlite://")
    goods.create(engine)
    with engine.begin() as conn:
        conn.execute(goods.insert(), [{"id": i, "name": f"g{i}", "stock": 10, "sales": 10} for i in (1, 2, 3)])
        conn.execute(
            update(goods).where(goods.c.id.in_([1, 3])).values(stock=goods.c.stock + IntCase(goods.c.id, {1: 5, 3: -2}))
        )
        assert conn.execute(select(goods.c.id, goods.c.stock).order_by(goods.c.id)).all() == [(1, 15), (2, 10), (3, 8)]


@pytest.mark.parametrize("values", [{1: "1; DROP TABLE goods"}, {"1 OR 1=1": 1}, {1: 1.5}, {1: True}])
def test_anything_but_an_integer_is_refused_before_it_reaches_sql(values):
    with pytest.raises(TypeError):
        IntCase(goods.c.id, values)


def test_the_statement_is_compiled_each_time_not_cached():
    engine = create_engine("sqlite://")
    goods.create(engine)
    with engine.begin() as conn:
        for n in range(1, 30):  # every batch a different list: the cache must not grow with them
            conn.execute(update(goods).values(stock=goods.c.stock + IntCase(goods.c.id, {n: n})))
        conn.execute(text("SELECT 1"))
    assert len(engine._compiled_cache) < 5
