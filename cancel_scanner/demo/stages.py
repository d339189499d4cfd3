"""The demo's view of the flow's stages, by name: its fast job settings, what each will finish for
a plan, and how the screen labels them. The one production module outside scanners/ that spells
stage names: the demo shows this flow, not any flow."""

from __future__ import annotations

from typing import Any

from cancel_scanner.i18n import N_

_FAST = {"interval_seconds": 0.3, "retry_delays_seconds": [0.5, 1]}
DEMO_JOBS = {
    "intake": {**_FAST, "batch_size": 10},
    "close_unpaid": {**_FAST, "batch_size": 20, "concurrency": 8},
    "submit_refund": {**_FAST, "batch_size": 20, "concurrency": 8},
    "poll_refund": {**_FAST, "batch_size": 50, "concurrency": 8, "poll_delays_seconds": [0.5, 1]},
    "sync_result": {**_FAST, "batch_size": 20},
    "restore_stock": {**_FAST, "batch_size": 20},
    "decrement_sales": {**_FAST, "batch_size": 20},
    "part_goods": {**_FAST, "batch_size": 20},
}

STAGE_FAILED_LABEL = {"intake": N_("rejected"), "poll_refund": N_("closed")}  # what a 1/0 row of the stage is
SHORT_NAMES = {
    "intake": "in",
    "close_unpaid": "close",
    "submit_refund": "sub",
    "poll_refund": "poll",
    "sync_result": "sync",
    "restore_stock": "stock",
    "decrement_sales": "sales",
    "part_goods": "part",
}


def expected_totals(plan: Any) -> dict[str, int]:
    """Rows each stage will finish for ``plan`` (a demo.plan.Plan), for the progress bars."""
    refunds = sum(1 for o in plan.orders if o.kind in ("paid", "closed", "abnormal", "lost_payment", "partial"))
    return {
        "intake": len(plan.requests),
        "close_unpaid": sum(1 for o in plan.orders if o.kind in ("unpaid", "lost_payment")),
        "submit_refund": refunds,
        "poll_refund": refunds,
        "sync_result": refunds,
        "restore_stock": sum(1 for o in plan.orders if o.stock_back and o.kind != "partial"),
        "decrement_sales": sum(1 for o in plan.orders if o.refunded and o.kind != "partial"),
        "part_goods": sum(1 for o in plan.orders if o.kind == "partial"),
    }
