"""Given/when/then helpers that let tests read like the flow.

Rows are written with plain SQL and only the columns the shop's systems write,
exactly as a merchant's tool or the order system would (testsupport.shop, shared with
the acceptance harness).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, text

from cancel_scanner import models
from cancel_scanner.config import Config, parse_config
from cancel_scanner.engine.runner import Hooks, Runner
from cancel_scanner.engine.status import collect_status
from cancel_scanner.scanners import REGISTRY, build_stages
from testsupport import shop

T0 = datetime(2026, 11, 1, 12, 0, 0)
TABLES = ("goods", "goods_order2", "req_order_ops", "refund_order", "goods_order2_oplog")
# The seven stages, in the order a cancel flows through them: what the registry, jobs.yaml and the summary list.
STAGES_IN_FLOW_ORDER = (
    "intake",
    "close_unpaid",
    "submit_refund",
    "poll_refund",
    "sync_result",
    "restore_stock",
    "decrement_sales",
    "part_goods",
)

# An order's oplog events, in order, when its first refund was closed and an operator's reissue succeeded
# (stock and sales follow, one event each).
REISSUED_REFUND_EVENTS = (
    "CANCELLED",
    "REFUND_SUBMITTED",
    "REFUND_FAILED",
    "REFUND_REISSUED#2",
    "REFUND_SUBMITTED#2",
    "REFUND_SUCCEEDED#2",
)

FAST_JOBS = {
    "intake": {"batch_size": 50},
    "close_unpaid": {"batch_size": 40, "concurrency": 8, "retry_delays_seconds": [1, 2, 4], "lease_seconds": 60},
    "submit_refund": {"batch_size": 40, "concurrency": 8, "retry_delays_seconds": [1, 2, 4], "lease_seconds": 60},
    "poll_refund": {"batch_size": 40, "concurrency": 8, "poll_delays_seconds": [1, 2], "retry_delays_seconds": [1, 2]},
    "sync_result": {"batch_size": 50},
    "restore_stock": {"batch_size": 50},
    "decrement_sales": {"batch_size": 50},
}


def test_config(db_url: str, jobs: dict | None = None, **top: Any) -> Config:
    raw = {
        "database_url": db_url,
        "wechat": {"mode": "sandbox", "timeout_seconds": [2, 2]},
        "jobs": {**FAST_JOBS, **(jobs or {})},
        # the tests that read human text read it in English; those about the language set their own
        "locale": "en",
        **top,
    }
    return parse_config(raw, REGISTRY, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"})


test_config.__test__ = False  # not a test, despite the name


def add_goods(db: Engine, goods_id: int, *, stock: int = 100, sales: int = 50, name: str | None = None) -> None:
    shop.insert_goods_rows(db, [shop.goods_row(goods_id, stock=stock, sales=sales, name=name)])


def add_order(db: Engine, order_id: int, *, transaction_id: str | None | bool = True, **row: Any) -> None:
    """An order as the shop's own order system inserts it (``shop.order_row``'s options): no flag columns;
    paid a day before T0. A falsy ``transaction_id`` is none."""
    shop.insert_orders(db, [shop.order_row(order_id, transaction_id=transaction_id or None, now=T0, **row)])


def request_cancel(db: Engine, order_id: int, **request: Any) -> int:
    """What a merchant's tool does: insert four columns, nothing else (``shop.request_cancel``'s op_type,
    operator and reason, by name)."""
    return shop.request_cancel(db, order_id, **request)


def row(db: Engine, table: str, row_id: int) -> Any:
    """One row, typed through the models (datetimes are datetimes on SQLite too)."""
    t = models.metadata.tables[table]
    with db.connect() as conn:
        return conn.execute(select(t).where(t.c.id == row_id)).mappings().one()


def refunds(db: Engine) -> dict[int, Any]:
    """Every refund_order row by order id, typed."""
    with db.connect() as conn:
        return {r["order_id"]: r for r in conn.execute(select(models.refund_order)).mappings().all()}


def rows(db: Engine, sql: str, **params: Any) -> list:
    with db.connect() as conn:
        return list(conn.execute(text(sql), params).mappings().all())


def scalar(db: Engine, sql: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def drop_index(conn: Any, table: str, index: str) -> None:
    """What an older schema lacked, for the migration tests: SQLite names an index alone, MySQL with its table."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"DROP INDEX {index}")
    else:
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP INDEX {index}")


def checksum(db: Engine) -> str:
    """One digest of every row of the five tables, for "a second run changes nothing"."""
    digest = hashlib.sha256()
    with db.connect() as conn:
        for table in TABLES:
            for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id")).all():
                digest.update(repr(tuple(r)).encode())
    return digest.hexdigest()


@dataclass
class Clock:
    """The time the stages see; tests move it instead of sleeping."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def epoch(self) -> float:
        return (self.now - datetime(1970, 1, 1)).total_seconds()


@dataclass
class World:
    """A database, the emulator with its real HTTP client, and runners over them."""

    db: Engine
    config: Config
    sandbox: Any
    clock: Clock = field(default_factory=Clock)

    @property
    def emulator(self):
        return self.sandbox.emulator

    def runner(
        self, hooks: Hooks | None = None, owner: str | None = None, *, gateway: Any = None, **options: Any
    ) -> Runner:
        return Runner(
            self.db,
            self.config,
            build_stages(self.config),
            gateway or self.sandbox.gateway,
            clock=self.clock,
            hooks=hooks,
            owner=owner,
            **options,
        )

    def settle(self, runner: Runner | None = None, *, rounds: int = 30, step_seconds: float = 5) -> None:
        """Run every stage until idle, move the clock on, and again, until nothing is pending."""
        runner = runner or self.runner()
        try:
            for _ in range(rounds):
                runner.run_until_idle(self.clock.now)
                if not pending(self.db):
                    return
                self.clock.advance(step_seconds)
            raise AssertionError(f"still pending after {rounds} rounds: {pending(self.db)}")
        finally:
            runner.close()


def pending(db: Engine, config: Config | None = None) -> dict[str, int]:
    """Rows some stage will still act on, by stage: what `status` reports as pending."""
    config = config or parse_config({}, REGISTRY, env={})
    report = collect_status(db, build_stages(config), T0)
    return {s.stage: s.pending for s in report.stages if s.pending}
