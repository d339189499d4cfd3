"""Partial cancels end to end (issue 26): two daemons on MariaDB over real HTTP to the emulator, which
keeps WeChat's spacing between two refunds of one payment (shortened to 2 s here, as the daemons' own
setting). Orders receive partial cancels, some for the same order at once, some in the same second,
mixed with whole cancels and requests that must be refused; one daemon is killed (-9) twice meanwhile.

At the end, for every order: the emulator refunded exactly the rule's amount for the units accepted
(never above what was paid), the database says the same, stock and sales moved by exactly those
units, no refund number was created twice, and the daemons never sent a refund before its payment's
turn (no 429 at all: the emulator has no other limit here)."""

from __future__ import annotations

import random
from collections import defaultdict

from cancel_scanner.scanners.parts import part_amount, refunded_for
from tests.acceptance import harness
from testsupport import shop
from testsupport.processes import LogFollower

SPACING = 2.0
PAID = 24
SETTLE_SECONDS = 150


def request(db, order_id: int, quantity: int | None) -> int:
    return shop.request_cancel(db, order_id, operator="clerk", reason="缺货 out of stock", quantity=quantity)


def test_partial_cancels_under_two_daemons_and_kills_refund_exactly_the_units_accepted(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    watch = harness.Stopwatch()
    rng = random.Random(26)
    emu = external_emulators(tmp_path / "keys", latency=(0.01, 0.05), refund_spacing=SPACING)
    shop.insert_goods(mysql_db, {1: (1_000, 100_000), 2: (1_000, 100_000)})
    orders = [shop.order_row(i, goods_id=1 + i % 2, quantity=5, amount=1001 + 37 * i) for i in range(1, PAID + 1)]
    orders += [shop.order_row(100 + i, goods_id=1, quantity=3, amount=900, paid=False) for i in range(4)]
    orders += [shop.order_row(200 + i, goods_id=2, quantity=3, amount=900, status="SHIPPED") for i in range(2)]
    shop.insert_orders(mysql_db, orders)
    baseline = {g["id"]: (g["stock"], g["sales"]) for g in harness.q_rows(mysql_db, "SELECT * FROM goods")}

    jobs = harness.fast_jobs(submit_refund={"refund_spacing_seconds": SPACING})
    config = harness.daemon_config(mysql_url, emu, jobs=jobs)
    fleet = [daemons(tmp_path / name, config, emu.env(), name=name) for name in ("d1", "d2")]
    for d in fleet:
        d.start()
    for d in fleet:
        d.wait_started()

    must: dict[int, str] = {}  # request id -> the code it must get whatever the order of processing
    pairs: list[tuple[int, int]] = []  # two requests of which exactly one must be accepted
    for order_id in range(1, PAID + 1):
        kind = order_id % 4
        if kind == 0:  # three parts of one order at once, the last unit later
            for k in (1, 1, 2):
                request(mysql_db, order_id, k)
        elif kind == 1:  # a part, then the rest in the same second
            request(mysql_db, order_id, 2)
            request(mysql_db, order_id, None)
        elif kind == 2:  # all five, and a part racing it: one of the two wins
            pairs.append((request(mysql_db, order_id, 5), request(mysql_db, order_id, 1)))
        else:  # refused quantities, then two parts of three of which only one fits
            must[request(mysql_db, order_id, 0)] = "BAD_QUANTITY"
            must[request(mysql_db, order_id, 6)] = "QUANTITY_EXCEEDS_REMAINING"
            pairs.append((request(mysql_db, order_id, 3), request(mysql_db, order_id, 3)))
    for i in range(4):
        must[request(mysql_db, 100 + i, 1)] = "PARTIAL_UNPAID"
    for i in range(2):
        must[request(mysql_db, 200 + i, 1)] = "ORDER_SHIPPED"

    # kill -9 the first daemon twice while the refunds go out, each time at a refund acceptance or a random moment
    for _ in range(2):
        if not LogFollower(fleet[0]).wait_for(lambda r: r.get("action") == "accepted", timeout=10):
            harness.hold(rng.uniform(0.2, 1.0), fleet[0].check_alive, interval=0.05)
        fleet[0].kill9()
        fleet[0].start()
        fleet[0].wait_started()
    for order_id in range(4, PAID + 1, 4):
        request(mysql_db, order_id, 1)  # the last unit of the three-part orders

    harness.wait_settled(mysql_db, SETTLE_SECONDS, fleet)
    harness.stop_all(*fleet, timeout=30)

    reqs = {r["id"]: r for r in harness.q_rows(mysql_db, "SELECT * FROM req_order_ops")}
    assert all(r["scanned"] == 1 for r in reqs.values())
    assert {rid: reqs[rid]["result_code"] for rid in must} == must
    for a, b in pairs:
        assert sorted(reqs[x]["result_code"] == "OK" for x in (a, b)) == [False, True], (reqs[a], reqs[b])

    snap = emu.emulator.snapshot()
    assert all(n == 1 for n in snap["refunds_created"].values()), "a refund number created twice"
    assert not any(status == 429 for (_method, status) in snap["requests"]), "a refund sent before its turn"
    for times in snap["refunds_at"].values():
        assert all(b - a >= SPACING for a, b in zip(times, times[1:], strict=False)), times

    db_orders = {o["id"]: o for o in harness.q_rows(mysql_db, "SELECT * FROM goods_order2")}
    refunds = defaultdict(list)
    for r in harness.q_rows(mysql_db, "SELECT * FROM refund_order ORDER BY refund_seq"):
        refunds[r["order_id"]].append(r)
    moved = defaultdict(int)
    for order_id in range(1, PAID + 1):
        o = db_orders[order_id]
        c, total = o["cancelled_quantity"], o["total_amount"]
        accepted_units = sum(
            r["quantity"]
            for r in reqs.values()
            if r["order_id"] == order_id and r["result_code"] == "OK" and r["quantity"] is not None
        )
        expected = refunded_for(total, 5, c)
        assert snap["fen_refunded"].get(o["order_no"], 0) == expected == o["refunded_amount"] <= total, order_id
        done = 0
        for r in refunds[order_id]:  # each refund is its units' share, in the order they were accepted
            assert r["refund_amount"] == part_amount(total, 5, done, r["quantity"]), (order_id, r["refund_seq"])
            done += r["quantity"]
        assert done == c and (c == 5) == (o["order_status"] == "CANCELLED"), order_id
        if any(r["quantity"] is None for r in reqs.values() if r["order_id"] == order_id and r["result_code"] == "OK"):
            assert c == 5
        else:
            assert c == accepted_units
        moved[o["goods_id"]] += c
    for goods in harness.q_rows(mysql_db, "SELECT * FROM goods"):
        stock0, sales0 = baseline[goods["id"]]
        assert (goods["stock"], goods["sales"]) == (stock0 + moved[goods["id"]], sales0 - moved[goods["id"]])
    harness.report(
        "partial cancels",
        requests=len(reqs),
        refunds=sum(len(v) for v in refunds.values()),
        fen=sum(snap["fen_refunded"].values()),
        seconds=watch.elapsed,
    )
