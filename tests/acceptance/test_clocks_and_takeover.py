"""Issue 10: daemons whose clocks drift, that are killed -9 or paused, on one MariaDB.

Real processes: `cancel-scanner run` in subprocesses (one under Debian's `faketime`, which shifts
the wall clock the process sees, signatures included), the emulator in the test process counting
every call in flight per out_refund_no. Every scenario ends with the harness's invariants.
"""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from tests.acceptance import harness
from testsupport import shop
from testsupport.waiting import wait_until

pytestmark = [pytest.mark.mysql, pytest.mark.slow]
TAKEOVER_BOUND_SECONDS = 15
STOP_SECONDS = 30  # SIGTERM to exit, for every daemon here


def faketime_env(offset: str) -> dict[str, str]:
    """The environment that makes a process see its wall clock shifted by ``offset`` (e.g. "+4m")."""
    libs = sorted(
        glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
    )
    if not libs:
        pytest.fail("libfaketime is required (Debian package faketime; scripts/test installs it)", pytrace=False)
    # Only the wall clock: with a shifted monotonic clock, libfaketime's timed waits (Event.wait,
    # the scheduler's) would sleep for the offset on top of their timeout.
    return {"LD_PRELOAD": libs[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}


def seed(db, first: int, n: int) -> list[dict]:
    """Orders and their cancel requests."""
    orders = [
        shop.order_row(i, goods_id=1 + i % 3, quantity=1, amount=100 + i % 50, paid=True)
        for i in range(first, first + n)
    ]
    shop.insert_orders(db, orders)
    shop.insert_requests(db, [(o["id"], "MERCHANT_CANCEL", "ops", "clock test") for o in orders])
    return orders


def accepted_not_recorded(db, emu) -> set[str]:
    created = set(emu.emulator.snapshot()["refunds_created"])
    recorded = {
        r["out_refund_no"]
        for r in harness.q_rows(db, "SELECT out_refund_no FROM refund_order WHERE submit_success = 1")
    }
    return created - recorded


@pytest.mark.parametrize("offset", ["+4m", "+10m"])
def test_two_daemons_one_with_a_fast_clock_never_call_one_number_twice_and_record_every_acceptance(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons, offset
):
    watch = harness.Stopwatch()
    emu = external_emulators(tmp_path / "keys", latency=(0.1, 0.3))
    shop.insert_goods(mysql_db, {g: (1000, 100_000) for g in (1, 2, 3)})
    orders = [shop.order_row(i, goods_id=1 + i % 3, quantity=1, amount=100 + i % 50, paid=True) for i in range(1, 121)]
    shop.insert_orders(mysql_db, orders)
    baseline = harness.Baseline.take(mysql_db)
    # Small batches, few threads: both daemons keep coming back for the same rows.
    jobs = harness.fast_jobs(
        submit_refund={"batch_size": 10, "concurrency": 4}, poll_refund={"batch_size": 10, "concurrency": 4}
    )
    config = harness.daemon_config(mysql_url, emu, jobs=jobs)
    honest = daemons(tmp_path / "honest", config, emu.env(), name="honest")
    fast = daemons(tmp_path / "fast", config, {**emu.env(), **faketime_env(offset)}, name="fast")
    for d in (fast, honest):
        d.start()
    for d in (fast, honest):
        d.wait_started()
    shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "ops", "clock test") for o in orders])
    baseline_orders = orders

    harness.wait_settled(mysql_db, 180, [honest, fast])
    harness.stop_all(honest, fast, timeout=STOP_SECONDS)

    totals = harness.check_invariants(
        mysql_db, emu, harness.Scenario(f"clock {offset}", baseline, daemons=[honest, fast])
    )
    snap = emu.emulator.snapshot()
    assert {no: n for no, n in snap["max_in_flight"].items() if n > 1} == {}
    assert accepted_not_recorded(mysql_db, emu) == set()
    assert (
        harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE submit_scanned = 1 AND submit_success = 0")
        == 0
    )
    fast_logs = fast.logs()
    offsets = [r for r in fast_logs if r.get("action") == "clock_offset"]
    assert offsets and abs(offsets[0]["offset_seconds"]) > 200, "the fast daemon must say its clock is off"
    if offset == "+10m":
        assert offsets[0]["level"] == "ERROR"
        assert any(r.get("action") == "blocked" for r in fast_logs), "SIGN_ERROR must block its gateway stages"
    else:
        worked = sum(1 for r in fast_logs if r.get("action") == "accepted")
        assert worked > 0, "4 minutes is within WeChat's window: the fast daemon does its share"
    harness.report(f"clock {offset}", n=len(baseline_orders), seconds=watch.elapsed, **totals)


def leased_by_someone(db) -> int:
    return harness.q_scalar(
        db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner IS NOT NULL AND submit_scanned = 0"
    )


def paid_orders_and_emulator(tmp_path, db, external_emulators, n: int, latency: tuple[float, float]):
    """n paid orders cancelled, an emulator whose calls take ``latency``, and the baseline to check against."""
    emu = external_emulators(tmp_path / "keys", latency=latency)
    shop.insert_goods(db, {g: (1000, 100_000) for g in (1, 2, 3)})
    seed(db, 1, n)
    return emu, harness.Baseline.take(db)


def wait_holding_leases(db, daemon) -> None:
    wait_until(
        lambda: leased_by_someone(db),
        60,
        f"{daemon.name} holds leases",
        until=lambda n: n > 0,
        daemons=[daemon],
        interval=0.02,
    )


def test_a_daemon_killed_9_mid_calls_has_its_work_taken_over_within_15_seconds(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu, baseline = paid_orders_and_emulator(tmp_path, mysql_db, external_emulators, 120, latency=(0.3, 0.6))
    jobs = harness.fast_jobs(
        submit_refund={"batch_size": 40, "concurrency": 4, "lease_seconds": 120}, poll_refund={"lease_seconds": 120}
    )
    config = harness.daemon_config(mysql_url, emu, jobs=jobs)
    victim = daemons(tmp_path / "victim", config, emu.env(), name="victim").start()
    wait_holding_leases(mysql_db, victim)
    victim.kill9()
    killed_at = time.monotonic()
    survivor = daemons(tmp_path / "survivor", config, emu.env(), name="survivor").start()

    owner = next(r["owner"] for r in victim.logs() if r.get("action") == "started")
    held = harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner = :o", o=owner)
    assert held > 0, "the victim released its leases before the kill: nothing to take over"
    wait_until(
        lambda: harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner = :o", o=owner),
        TAKEOVER_BOUND_SECONDS + 10,
        "the dead daemon's leases released",
        until=lambda n: n == 0,
        daemons=[survivor],
        interval=0.05,
    )
    took = time.monotonic() - killed_at
    assert took < TAKEOVER_BOUND_SECONDS, f"took over {held} lease(s) after {took:.1f}s"
    harness.wait_settled(mysql_db, 180, [survivor])
    harness.stop_all(survivor, timeout=STOP_SECONDS)
    totals = harness.check_invariants(mysql_db, emu, harness.Scenario("kill -9 takeover", baseline, daemons=[survivor]))
    assert {no: n for no, n in emu.emulator.snapshot()["max_in_flight"].items() if n > 1} == {}
    harness.report("kill -9 takeover", takeover_seconds=round(took, 1), **totals)


def test_a_daemon_paused_past_its_lease_sends_nothing_when_it_resumes(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu, baseline = paid_orders_and_emulator(tmp_path, mysql_db, external_emulators, 60, latency=(0.2, 0.4))
    jobs = harness.fast_jobs(submit_refund={"batch_size": 30, "concurrency": 2, "lease_seconds": 15})
    config = harness.daemon_config(mysql_url, emu, jobs=jobs, wechat={"apply_qps": 5})
    paused = daemons(tmp_path / "paused", config, emu.env(), name="paused").start()
    wait_holding_leases(mysql_db, paused)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        other = daemons(tmp_path / "other", config, emu.env(), name="other").start()
        harness.wait_settled(mysql_db, 180, [other])
        calls_before = sum(emu.emulator.snapshot()["requests"].values())
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    wait_until(
        lambda: [r for r in paused.logs() if r.get("action") == "declared_dead"],
        30,
        "the paused daemon finds it was declared dead",
        until=bool,
        interval=0.1,
    )
    # Whatever it still held from before the pause: not one more call.
    harness.hold(3, lambda: assert_no_more_calls(emu, calls_before))
    harness.stop_all(paused, other, timeout=STOP_SECONDS)
    harness.check_invariants(mysql_db, emu, harness.Scenario("paused", baseline, daemons=[paused, other]))
    assert {no: n for no, n in emu.emulator.snapshot()["max_in_flight"].items() if n > 1} == {}


def assert_no_more_calls(emu, before: int) -> None:
    now = sum(emu.emulator.snapshot()["requests"].values())
    assert now == before, f"{now - before} call(s) after the paused daemon resumed"
