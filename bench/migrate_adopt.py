"""`cancel-scanner migrate` adopting a shop's goods_order2 of 1,000,000 orders while the shop writes.

The shop's tables have only the shop's columns (as a shop that never ran cancel-scanner has them).
A shop writer inserts one order every ``--gap-ms`` ms on its own autocommit connection, first for
``--idle-seconds`` with nothing else running, then during the migration, then again after it.
Reported: migrate's wall time per step and in all; each insert's latency (p50/p99/max) before
and during; the longest an insert was held (and whether any waited past the migration's
per-try metadata-lock bound); and p99 during / p99 idle, measured in the same run.

    .venv/bin/python -m bench.migrate_adopt [--quick] [--orders 1000000] [--gap-ms 2] [--idle-seconds 3]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from bench import reporting
from bench.database import Bench
from cancel_scanner.app import migration_plan
from cancel_scanner.engine import migrate
from cancel_scanner.engine.db import make_engine

SHOP_TABLES = (
    "CREATE TABLE goods (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL,"
    " stock INT UNSIGNED NOT NULL DEFAULT 0, sales INT UNSIGNED NOT NULL DEFAULT 0) ENGINE=InnoDB",
    "CREATE TABLE goods_order2 (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, order_no VARCHAR(64) NOT NULL,"
    " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, goods_id BIGINT NOT NULL, quantity INT UNSIGNED NOT NULL,"
    " total_amount INT UNSIGNED NOT NULL, pay_status TINYINT NOT NULL DEFAULT 0, transaction_id VARCHAR(32) NULL,"
    " paid_at DATETIME NULL, order_status VARCHAR(16) NOT NULL DEFAULT 'UNPAID', is_deleted TINYINT NOT NULL DEFAULT 0,"
    " created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, UNIQUE KEY shop_order_no (order_no)) ENGINE=InnoDB",
)
CHUNK = 100_000


def seed(conn, orders: int) -> None:
    with conn.cursor() as cur:
        for stmt in SHOP_TABLES:
            cur.execute(stmt)
        cur.execute(
            "INSERT INTO goods (id, name, stock, sales) SELECT seq, CONCAT('g', seq), 1000, 10 FROM seq_1_to_100"
        )
        for lo in range(1, orders + 1, CHUNK):
            hi = min(orders, lo + CHUNK - 1)
            cur.execute(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount,"
                " pay_status, transaction_id, paid_at, order_status)"
                f" SELECT seq, CONCAT('SO', seq), seq % 977, 7, 1 + seq % 100, 1 + seq % 3, 100 + seq % 50, 1,"
                f" CONCAT('4200', LPAD(seq, 24, '0')), NOW(), 'PAID' FROM seq_{lo}_to_{hi}"
            )
        cur.execute("ANALYZE TABLE goods_order2")


class ShopWriter(threading.Thread):
    """One INSERT INTO goods_order2 every gap seconds (autocommit); each latency with its phase."""

    def __init__(self, url: str, first_id: int, gap: float) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        self.next_id, self.gap = first_id, gap
        self.phase = "idle"
        self.latencies: dict[str, list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            due = time.monotonic()
            while not self.stop.is_set():
                started = time.monotonic()
                conn.execute(
                    text(
                        "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount)"
                        " VALUES (:id, :no, 1, 7, 1, 1, 100)"
                    ),
                    {"id": self.next_id, "no": f"SHOP{self.next_id}"},
                )
                conn.commit()
                self.latencies.setdefault(self.phase, []).append(time.monotonic() - started)
                self.next_id += 1
                due += self.gap
                self.stop.wait(max(0.0, due - time.monotonic()))
        self.engine.dispose()


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=None)
    p.add_argument("--gap-ms", type=float, default=2.0)
    p.add_argument("--idle-seconds", type=float, default=3.0)
    args = reporting.arguments(p)  # parsed, the product's logging quieted
    orders = reporting.size(args, "orders", quick=100_000, full=1_000_000)
    report = reporting.Report(f"migrate adopting a shop's goods_order2 of {orders:,} orders while the shop inserts")
    with Bench(report=report) as bench:
        url = bench.server.create_database("adopt")
        conn = bench.connect("adopt")
        seeded = time.monotonic()
        seed(conn, orders)
        report.note(f"seeded {orders:,} shop orders in {time.monotonic() - seeded:.1f} s")
        db = make_engine(url)
        writer = ShopWriter(url, orders + 1, args.gap_ms / 1000)
        writer.start()
        time.sleep(args.idle_seconds)  # the shop alone: the baseline (a benchmark, not a test)

        writer.phase = "migrate"
        steps: list[list] = []
        started = time.monotonic()
        the_plan = migration_plan(db)
        for step in the_plan.steps:
            one = migrate.Plan(the_plan.database, the_plan.current, the_plan.head, [step], [])
            t0 = time.monotonic()
            migrate.apply(db, one)
            steps.append([step.what[:70], round(time.monotonic() - t0, 3), step.locks[:60]])
        total = time.monotonic() - started
        writer.phase = "after"
        time.sleep(1.0)
        writer.stop.set()
        writer.join(10)
        db.dispose()

        report.table("migrate, step by step", ["step", "seconds", "locks"], steps)
        rows = []
        for phase in ("idle", "migrate", "after"):
            lat = writer.latencies.get(phase, [])
            rows.append(
                [
                    phase,
                    len(lat),
                    round(reporting.percentile(lat, 50) * 1000, 2),
                    round(reporting.percentile(lat, 99) * 1000, 2),
                    round(max(lat) * 1000, 1) if lat else None,
                ]
            )
        report.table("shop INSERT INTO goods_order2 latency (ms)", ["phase", "inserts", "p50", "p99", "max"], rows)
        idle99 = reporting.percentile(writer.latencies["idle"], 99)
        during = writer.latencies.get("migrate", [])
        worst = max(during) if during else 0.0
        report.target(
            "migrate time", f"{total:.2f} s for {orders:,} orders", "minutes at most (online DDL)", total < 120
        )
        report.target(
            "shop inserts held",
            f"longest {worst * 1000:.0f} ms; p99 during / idle {reporting.ratio(reporting.percentile(during, 99), idle99):.1f}",
            f"none past the {migrate.LOCK_WAIT_SECONDS} s metadata-lock bound",
            worst < migrate.LOCK_WAIT_SECONDS,
        )
        conn.close()
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
