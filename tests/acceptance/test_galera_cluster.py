"""Issue 16: three daemons, one per node of a three-node Galera cluster, over a few hundred requests
with gateway faults; one node killed -9 mid-run and restarted once the survivors took its
daemon's work over. Every refund created once at the emulator, at most one call in flight per
out_refund_no, no oplog event twice, stock and sales exact (the harness's invariants).
"""

from __future__ import annotations

import time
import uuid

import pytest

from cancel_scanner.engine.db import init_schema, make_engine
from tests.acceptance import harness
from testsupport import shop
from testsupport.emulator_faults import FaultPlan
from testsupport.waiting import wait_until

pytestmark = [
    pytest.mark.mysql,
    pytest.mark.galera,
    pytest.mark.slow,
    pytest.mark.xdist_group("galera"),
]  # one worker, one cluster (scripts/test: --dist loadgroup)
N = 240
VICTIM = 1  # the node killed, and the daemon connected to it
TAKEOVER_BOUND_SECONDS = 30  # takeover_seconds (10) + a heartbeat + a claim round, on two loaded cores


def test_three_daemons_on_three_nodes_survive_a_node_killed_mid_run(
    tmp_path, galera_cluster, external_emulators, daemons
):
    cluster = galera_cluster
    name = f"acc_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    urls = [cluster.url_for(i, name) for i in range(3)]
    db = make_engine(urls[0])
    try:
        init_schema(db)
        emu = external_emulators(
            tmp_path / "keys", faults=FaultPlan(p_5xx=0.05, after_commit=0.5, seed=16), latency=(0.05, 0.15)
        )
        shop.insert_goods(db, {g: (1_000, 100_000) for g in (1, 2, 3)})
        orders = [shop.order_row(i, goods_id=1 + i % 3, amount=100 + i % 50) for i in range(1, N + 1)]
        shop.insert_orders(db, orders)
        for o in orders:
            emu.emulator.register_payment(o["no"], o["amount"], o["txn"])
        baseline = harness.Baseline.take(db)
        jobs = harness.fast_jobs(
            submit_refund={"batch_size": 20, "concurrency": 4, "lease_seconds": 60},
            poll_refund={"batch_size": 20, "concurrency": 4, "lease_seconds": 60},
        )
        crew = [
            daemons(
                tmp_path / f"d{i}",
                harness.daemon_config(urls[i], emu, jobs=jobs),
                emu.env(),
                name=f"node{i + 1}-daemon",
            )
            for i in range(3)
        ]
        for d in crew:
            d.start()
        for d in crew:
            d.wait_started()
        shop.insert_requests(db, [(o["id"], "MERCHANT_CANCEL", "ops", "galera") for o in orders])

        victim = crew[VICTIM]
        owner_sql = "SELECT owner FROM cancel_scanner_process WHERE pid = :pid"
        owner = wait_until(
            lambda: harness.q_scalar(db, owner_sql, pid=victim.pid), 30, "the victim registered", daemons=crew
        )
        held_sql = "SELECT COUNT(*) FROM refund_order WHERE lease_owner = :o"
        wait_until(
            lambda: harness.q_scalar(db, held_sql, o=owner),
            60,
            "the victim's daemon to hold leases",
            until=lambda n: n > 0,
            daemons=crew,
            interval=0.02,
        )
        cluster.kill(VICTIM)
        killed_at = time.monotonic()
        cluster.wait_size(2)
        wait_until(
            lambda: harness.q_scalar(db, held_sql, o=owner),
            TAKEOVER_BOUND_SECONDS,
            "the survivors to take the dead node's daemon's leases over",
            until=lambda n: n == 0,
            daemons=crew,
        )
        takeover = time.monotonic() - killed_at
        cluster.restart(VICTIM)
        # Its daemon backed off while its node was away; with the node back it beats again, finds its
        # entry reaped and goes on under a new owner id, dropping whatever it still held.
        wait_until(
            lambda: {r.get("action") for r in victim.logs()} & {"declared_dead", "heartbeat_recovered"},
            90,
            "the dead node's daemon to come back",
            daemons=crew,
        )

        harness.wait_settled(db, 240, crew)
        harness.stop_all(*crew, timeout=harness.SHUTDOWN_TIMEOUT_SECONDS + 30)
        totals = harness.check_invariants(db, emu, harness.Scenario("galera node killed", baseline, daemons=crew))
        snap = emu.emulator.snapshot()
        assert {no: n for no, n in snap["max_in_flight"].items() if n > 1} == {}
        assert len(snap["refunds_created"]) == N and set(snap["refunds_created"].values()) == {1}
        assert takeover < TAKEOVER_BOUND_SECONDS
        back = victim.logs()
        actions = {r.get("action") for r in back}
        assert {"backoff", "heartbeat_failed"} <= actions and "declared_dead" in actions, sorted(map(str, actions))
        harness.report("galera node killed", n=N, seconds=round(takeover, 1), **totals)
    finally:
        db.dispose()
