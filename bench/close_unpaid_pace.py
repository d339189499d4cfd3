"""close_unpaid against the emulator: closes per second against the configured pace, and 429s.

``--orders`` unpaid orders (placed 10 minutes ago, NOTPAY at WeChat) whose cancels intake has
accepted are settled by one in-process Runner (MariaDB, the real SDK over HTTP to the emulator,
which enforces its own per-call limit like WeChat). Each order costs a query, a close and a query.
Reported: closes/s and queries/s against wechat.pay_close_qps / pay_query_qps (paced at 95%),
the emulator's 429 count, and every trade closed exactly once.

    .venv/bin/python -m bench.close_unpaid_pace [--quick] [--orders 600] [--close-qps 50] [--query-qps 100]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import reporting
from bench.database import Bench
from cancel_scanner.engine.runner import Runner
from cancel_scanner.gateway.sandbox import start_sandbox
from cancel_scanner.scanners import build_stages
from tests.flow import test_config
from testsupport import shop

EMULATOR_LIMIT = 300  # per second, per call kind: what the emulator answers before it says 429


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=None)
    p.add_argument("--close-qps", type=float, default=50.0)
    p.add_argument("--query-qps", type=float, default=100.0)
    args = reporting.arguments(p)  # parsed, the product's logging quieted
    orders = reporting.size(args, "orders", quick=150, full=600)
    report = reporting.Report(f"close_unpaid: {orders} unpaid cancels against a pace of {args.close_qps:g} closes/s")
    with Bench(report=report) as bench:
        url, db = bench.database("close_pace")
        sandbox = start_sandbox(
            success_delay=0,
            pay_close_qps=args.close_qps,
            pay_query_qps=args.query_qps,
            emulator_apply_qps=EMULATOR_LIMIT,
            emulator_query_qps=EMULATOR_LIMIT,
        )
        sandbox.emulator.payment_qps = EMULATOR_LIMIT
        try:
            shop.insert_goods(db, {1: (1_000, 1_000)})
            rows = [shop.order_row(i, paid=False) for i in range(1, orders + 1)]
            shop.insert_orders(db, rows)
            for r in rows:
                sandbox.emulator.create_trade(r["no"], r["amount"])
            with db.begin() as conn:
                conn.exec_driver_sql(
                    "UPDATE goods_order2 SET cancel_requested_at = UTC_TIMESTAMP(3), cancel_source = 'MERCHANT'"
                )
            config = test_config(
                url, jobs={"close_unpaid": {"batch_size": 200, "concurrency": 16, "lease_seconds": 60}}
            )
            runner = Runner(db, config, build_stages(config), sandbox.gateway)
            started = time.monotonic()
            runner.run_until_idle(stages=["close_unpaid"])
            took = time.monotonic() - started
            runner.close()
            counts = sandbox.emulator.payment_counts
            throttled = sum(n for (method, status), n in sandbox.emulator.requests.items() if status == 429)
            closed_once = (
                all(n == 1 for n in sandbox.emulator.closed_trades.values())
                and len(sandbox.emulator.closed_trades) == orders
            )
        finally:
            sandbox.close()
    closes_per_s, queries_per_s = counts["closes"] / took, counts["queries"] / took
    report.table(
        "close_unpaid, one Runner",
        ["orders", "seconds", "closes", "closes/s", "queries", "queries/s", "429s"],
        [
            [
                orders,
                round(took, 2),
                counts["closes"],
                round(closes_per_s, 1),
                counts["queries"],
                round(queries_per_s, 1),
                throttled,
            ]
        ],
    )
    pace = args.close_qps * 0.95
    report.target(
        "closes per second / pace",
        f"{closes_per_s:.1f} / {pace:.1f} = {closes_per_s / pace:.2f}",
        "<= 1.0, no 429",
        closes_per_s <= pace * 1.05 and throttled == 0,
    )
    report.target(
        "each trade closed once", f"{len(sandbox.emulator.closed_trades)} trades", f"{orders}, once each", closed_once
    )
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
