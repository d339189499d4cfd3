"""Two engines over the same MariaDB rows at the same time: one end state, no refund in flight twice."""

from __future__ import annotations

import threading

import pytest

from cancel_scanner.engine.runner import Hooks
from tests.flow import T0, World, add_goods, checksum, pending, rows, scalar, test_config
from testsupport import shop

pytestmark = pytest.mark.mysql
N = 1000


ORDERS_PLACED = (T0 - shop.ORDER_AGE).strftime("%Y-%m-%d %H:%M:%S")  # old enough for close_unpaid


def test_two_engines_at_once_give_the_same_end_state_as_one(mysql_db, mysql_url, sandbox):
    world = World(db=mysql_db, config=test_config(mysql_url), sandbox=sandbox)
    add_goods(world.db, 1, stock=0, sales=100_000)
    add_goods(world.db, 2, stock=0, sales=100_000)
    with world.db.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount, pay_status,"
            " transaction_id, order_status, created_at) VALUES "
            + ",".join(
                f"({i}, 'SO{i:010d}', 1, 1, {1 + i % 2}, 2, {500 + i}, {int(i % 5 != 0)},"
                f" {'NULL' if i % 5 == 0 else repr('42' + str(i))}, '{'UNPAID' if i % 5 == 0 else 'PAID'}', '{ORDERS_PLACED}')"
                for i in range(1, N + 1)
            )
        )
        conn.exec_driver_sql(
            "INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES "
            + ",".join(f"({i}, 'MERCHANT_CANCEL', 'm', 'r')" for i in range(1, N + 1))
        )
    committed = {"engine-a": 0, "engine-b": 0}

    def counter(owner):
        def count(stage, ids):
            committed[owner] += len(ids)

        return Hooks(before_commit=count)

    runners = [world.runner(owner=o, hooks=counter(o)) for o in committed]
    errors: list[BaseException] = []

    def run(runner):
        try:
            runner.run_until_idle(world.clock.now)
        except BaseException as exc:  # noqa: BLE001 - surfaced below; a thread must not swallow it
            errors.append(exc)

    for _ in range(20):
        threads = [threading.Thread(target=run, args=(r,)) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        if not pending(world.db):
            break
        world.clock.advance(5)
    for r in runners:
        r.close()

    assert pending(world.db) == {}
    paid = [i for i in range(1, N + 1) if i % 5 != 0]
    emulator = world.emulator
    assert {n: c for n, c in emulator.refunds_created.items() if c != 1} == {}
    assert len(emulator.refunds_created) == len(paid)
    assert all(emulator.fen_refunded[f"SO{i:010d}"] == 500 + i for i in paid)
    assert max(emulator.max_in_flight.values()) == 1
    assert scalar(world.db, "SELECT COUNT(*) FROM req_order_ops WHERE result_code = 'OK'") == N
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = 'CANCELLED'") == N
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog WHERE event = 'SALES_DECREMENTED'") == len(paid)
    stock = {r["id"]: r["stock"] for r in rows(world.db, "SELECT id, stock FROM goods")}
    assert stock == {1: 2 * (N // 2), 2: 2 * (N // 2)}
    sales = {r["id"]: r["sales"] for r in rows(world.db, "SELECT id, sales FROM goods")}
    assert sales[1] + sales[2] == 200_000 - 2 * len(paid)
    assert scalar(world.db, "SELECT COUNT(*) FROM goods_order2_oplog") == N + 4 * len(paid) + (N - len(paid))
    assert min(committed.values()) > 0, committed  # both engines really did part of the work
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner IS NOT NULL") == 0
    before = checksum(world.db)
    world.runner().run_until_idle(world.clock.advance(3600))
    assert checksum(world.db) == before
