"""N processes of one merchant share its WeChat QPS (issue 16): each paces at 1/N of the configured
limits, N counted from the live registry entries of that merchant at every heartbeat, and a process
that has just joined holds its calls until the others have read its entry and slowed down."""

from __future__ import annotations

import pytest

from cancel_scanner.engine.registry import Registry
from cancel_scanner.engine.runner import Runner
from cancel_scanner.gateway.wechat import PACING_HEADROOM
from cancel_scanner.scanners import build_stages
from tests.flow import Clock, test_config

APPLY_QPS = 2000  # the sandbox fixture's client pace
WHOLE = APPLY_QPS * PACING_HEADROOM


def share(n: int) -> float:
    """One of n processes' pace: an n-th of the whole, less one call a second for each of the others
    (n strict pacers land up to n - 1 more calls in one window than n times one's pace)."""
    return (WHOLE - (n - 1)) / n


def apply_calls_in(gateway, seconds: float) -> int:
    """Calls the apply pacer can start within `seconds` from now: its pace, or 0 while it holds."""
    return gateway.calls_within("apply", seconds)


def other_process(db, clock, group: str | None, owner: str, pid: int | None = None) -> Registry:
    """Another process's entry, registered here under `pid`: by default one that is alive but not ours
    (an entry of another owner under our own pid is a former life of ours, and shares nothing)."""
    import os

    entry = Registry(db, clock, (), owner=owner, pace_group=group)
    entry.beat()
    with db.begin() as conn:
        conn.exec_driver_sql(f"UPDATE cancel_scanner_process SET pid = {pid or os.getppid()} WHERE owner = '{owner}'")
    return entry


@pytest.fixture
def setup(db, db_url, sandbox):
    clock = Clock()
    config = test_config(db_url)
    runners: list[Runner] = []

    def runner(owner: str, gateway=None, **top) -> Runner:
        cfg = test_config(db_url, **top) if top else config
        made = Runner(db, cfg, build_stages(cfg), gateway or sandbox.gateway, clock=clock, owner=owner)
        runners.append(made)
        return made

    yield clock, runner, sandbox.gateway
    for r in runners:
        r.registry.deregister()
        r.close()


def test_a_process_alone_paces_at_the_whole_limit_and_at_a_third_once_two_more_of_its_merchant_run(setup, db):
    clock, runner, gateway = setup
    me = runner("me")
    me.registry.tick()
    assert me.registry.sharers == 1
    alone = apply_calls_in(gateway, 10.0)
    assert alone == pytest.approx(10 * WHOLE, abs=2)

    group = gateway.pace_group
    other_process(db, clock, group, "second")
    other_process(db, clock, group, "third")
    other_process(db, clock, "another-merchant", "theirs")  # its own limits: not a sharer of ours
    other_process(db, clock, None, "no-calls")  # calls nothing paced (a reissue, say)
    me.registry.tick()

    assert me.registry.sharers == 3
    assert apply_calls_in(gateway, 10.0) == pytest.approx(10 * share(3), abs=2)


def test_a_sharer_that_died_stops_counting_once_it_is_silent_for_takeover_seconds(setup, db):
    clock, runner, gateway = setup
    me = runner("me")
    me.registry.tick()
    other_process(db, clock, gateway.pace_group, "dies")
    me.registry.tick()
    assert me.registry.sharers == 2
    clock.advance(me.config.takeover_seconds - 1)
    me.registry.tick()
    assert me.registry.sharers == 2  # silent, but not for long enough: still counted (the safe side)
    clock.advance(2)
    me.registry.tick()
    assert me.registry.sharers == 1
    assert apply_calls_in(gateway, 10.0) == pytest.approx(10 * WHOLE, abs=2)


def test_a_newcomer_beside_running_sharers_starts_no_call_for_two_heartbeats(setup, db):
    clock, runner, gateway = setup
    other_process(db, clock, gateway.pace_group, "running")
    newcomer = runner("newcomer")
    newcomer.registry.tick()  # registers: fresh, among one other

    hold = 2 * newcomer.config.heartbeat_seconds
    half = share(2)
    assert apply_calls_in(gateway, hold - 0.2) == 0
    assert apply_calls_in(gateway, hold + 1.0) == pytest.approx(half, rel=0.1)  # then its share: half
    held = gateway.held_for("apply")
    newcomer.registry.tick()  # the next heartbeat: no longer new; the hold runs out, it is not renewed
    assert 0 < gateway.held_for("apply") <= held
    other_process(db, clock, gateway.pace_group, "third")
    newcomer.registry.tick()  # nor cut short by a count that changed
    assert newcomer.registry.sharers == 3
    assert 0 < gateway.held_for("apply") <= held


def test_with_qps_shared_off_each_process_paces_at_the_whole_limit(setup, db, sandbox):
    """wechat.qps_shared: false reaches the client (app._client_options), which then shares no pace."""
    from cancel_scanner.gateway.sandbox import client_for

    clock, runner, gateway = setup
    other_process(db, clock, gateway.pace_group, "running")
    alone = client_for(
        sandbox.keys,
        sandbox.emulator.base_url,
        timeout=(2, 2),
        apply_qps=APPLY_QPS,
        query_qps=APPLY_QPS,
        qps_shared=False,
    )
    try:
        me = runner("me", gateway=alone, wechat={"mode": "sandbox", "timeout_seconds": [2, 2], "qps_shared": False})
        me.registry.tick()
        assert me.registry.pace_group is None
        assert apply_calls_in(alone, 10.0) == pytest.approx(10 * WHOLE, abs=2)
    finally:
        alone.close()


def test_beside_other_processes_a_claim_takes_its_own_slice_of_the_rows_first_then_any(db, db_url, sandbox):
    """Of N live processes sorted by owner, the k-th claims the k-th of every N blocks of batch_size
    ids first: N claimers reach for different rows (on Galera, where SKIP LOCKED does not see another node's locks, the
    same rows would be settled only at COMMIT, as lost claims). When its slice runs dry it takes any."""
    from tests.flow import add_goods, add_order, request_cancel, rows

    clock = Clock()
    config = test_config(db_url, jobs={"intake": {"batch_size": 3}})
    add_goods(db, 1, stock=100, sales=50)
    for order_id in range(1, 9):
        add_order(db, order_id)
        request_cancel(db, order_id)
    ids = [r.id for r in rows(db, "SELECT id FROM req_order_ops ORDER BY id")]
    other_process(db, clock, None, "a-first")  # sorts before "b-me": we are number 1 of 2
    me = Runner(db, config, build_stages(config), sandbox.gateway, clock=clock, owner="b-me")
    try:
        me.registry.tick()
        assert me.registry.slice == (1, 2)

        def scanned() -> list[int]:
            return [r.id for r in rows(db, "SELECT id FROM req_order_ops WHERE scanned = 1 ORDER BY id")]

        me.run_stage("intake", clock.now)
        mine = [i for i in ids if (i // 3) % 2 == 1]  # blocks of batch_size (3) ids: every other one ours
        theirs = [i for i in ids if i not in mine]
        assert scanned() == mine[:3]
        me.run_stage("intake", clock.now)  # what is left of ours, then the other slice's oldest
        assert scanned() == sorted(mine[:6] + theirs[: max(0, 6 - len(mine))])
    finally:
        me.registry.deregister()
        me.close()


def test_the_entry_of_a_process_of_this_host_that_no_longer_exists_shares_nothing_and_holds_no_slice(setup, db):
    """A daemon killed -9 and started again: its former life's entry stays until takeover_seconds of
    silence, but its pid is gone, so the new life paces at the whole limit and claims every row."""
    import subprocess
    import sys

    clock, runner, gateway = setup
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    other_process(db, clock, gateway.pace_group, "former-life", pid=int(gone.stdout))
    me = runner("me")
    me.registry.tick()

    assert (me.registry.sharers, me.registry.slice) == (1, (0, 1))
    assert apply_calls_in(gateway, 10.0) == pytest.approx(10 * WHOLE, abs=2)
    assert me.registry.reap() == []  # and the reaper still waits takeover_seconds for it


def test_another_owner_under_our_own_pid_is_a_former_life_of_ours_and_shares_nothing(setup, db):
    """An INSERT of our entry that committed although we saw an error leaves an entry under our pid:
    nobody calls under it."""
    import os

    clock, runner, gateway = setup
    other_process(db, clock, gateway.pace_group, "lost-insert", pid=os.getpid())
    me = runner("me")
    me.registry.tick()
    assert (me.registry.sharers, me.registry.slice) == (1, (0, 1))


def test_processes_of_one_merchant_configured_with_other_limits_all_pace_at_the_strictest_and_say_so(setup, db):
    """Issue 23, item 5: each process publishes the limits it was configured with; the strictest wins."""
    from loguru import logger

    from cancel_scanner.alerts.config import AlertRules
    from cancel_scanner.alerts.rules import RULES, CallWindow, Reading
    from cancel_scanner.engine.registry import encode_limits

    clock, runner, gateway = setup
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["extra"].get("action", "")), level="INFO")
    try:
        me = runner("me")
        me.registry.tick()
        strict = other_process(db, clock, gateway.pace_group, "strict")
        with db.begin() as conn:  # it was given a tenth of our apply limit
            conn.exec_driver_sql(
                "UPDATE cancel_scanner_process SET pace_limits = '{}' WHERE owner = 'strict'".format(
                    encode_limits({**gateway.pace_limits(), "apply": APPLY_QPS / 10})
                )
            )
        me.registry.tick()
        me.registry.tick()  # the same disagreement again: said once
        assert apply_calls_in(gateway, 10.0) == pytest.approx(10 * ((APPLY_QPS / 10) * PACING_HEADROOM - 1) / 2, abs=2)
        assert me.pace_disagreement is not None and "apply 200/s" in me.pace_disagreement
        assert said.count("pace_limits_differ") == 1

        fire = RULES["config_error"][0]
        reading = Reading(
            snapshot=None,
            calls=CallWindow(600),
            down={},
            clock_offset=None,
            host="me",
            pace_disagreement=me.pace_disagreement,
        )
        subjects = dict(fire(AlertRules().config_error, reading, set()))
        assert subjects["limits"].firing and "apply 200/s" in subjects["limits"].summary  # the config_error alert

        strict.deregister()
        me.registry.tick()
        assert me.pace_disagreement is None and said.count("pace_limits_agree") == 1
        assert apply_calls_in(gateway, 10.0) == pytest.approx(10 * WHOLE, abs=2)
    finally:
        logger.remove(sink)


@pytest.mark.parametrize("shared", [True, False])
def test_wechat_qps_shared_in_jobs_yaml_decides_whether_the_built_daemon_shares_its_merchants_pace(db_url, shared):
    from contextlib import ExitStack

    from cancel_scanner.app import build_app

    with ExitStack() as stack:
        app = build_app(
            test_config(db_url, wechat={"mode": "sandbox", "timeout_seconds": [2, 2], "qps_shared": shared}), stack
        )
        assert app.runner.registry.pace_group == (app.gateway._mchid if shared else None)
        assert (app.runner.pace is not None) is shared
