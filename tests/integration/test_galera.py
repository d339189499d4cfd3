"""The Galera test bed (issue 16, first part): a three-node MariaDB Galera cluster on loopback, and
the flow run by a daemon's runner on each of two nodes at once.

Marked ``galera``: a cluster takes about half a minute to come up (one full state transfer per
joiner); CI runs these, and they share one cluster (tests/conftest.py's galera_cluster).
"""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import text

from cancel_scanner.engine.db import init_schema, make_engine
from tests.flow import Clock, add_goods, add_order, request_cancel, rows, scalar, test_config
from testsupport.waiting import wait_until

pytestmark = [
    pytest.mark.galera,
    pytest.mark.mysql,
    pytest.mark.xdist_group("galera"),
]  # one worker, one cluster (scripts/test: --dist loadgroup)


def fetch(url: str, sql: str, sync: bool = True):
    """Rows of `sql` on one node; `sync` (our engines' default) waits for the cluster's latest write."""
    engine = make_engine(url) if sync else make_engine(url, wsrep_sync_wait=0)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).all()
    finally:
        engine.dispose()


def test_a_write_on_one_node_is_read_on_the_others_and_a_killed_node_rejoins_with_what_it_missed(galera_cluster):
    cluster = galera_cluster
    name = f"bed_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    first, third = cluster.url_for(0, name), cluster.url_for(2, name)
    engine = make_engine(first)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(8))"))
            conn.execute(text("INSERT INTO t VALUES (1, 'one')"))
        assert fetch(third, "SELECT id, v FROM t") == [(1, "one")]

        cluster.kill(1)
        cluster.wait_size(2)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2, 'missed')"))  # while node 2 is dead
        cluster.restart(1)
        assert fetch(cluster.url_for(1, name), "SELECT id, v FROM t ORDER BY id") == [(1, "one"), (2, "missed")]
        assert cluster.status(1, "wsrep_cluster_size") == "3"
    finally:
        engine.dispose()


def test_two_runners_on_two_nodes_refund_every_order_once(galera_cluster, sandbox):
    """Row locks are local to a node: SKIP LOCKED on node 2 does not see node 1's, and the loser of a
    conflicting write gets 1213 at COMMIT. The leases and guarded flips must still make each
    refund once, each oplog event once, stock and sales exact."""
    cluster = galera_cluster
    from cancel_scanner.engine.runner import Runner
    from cancel_scanner.scanners import build_stages

    name = f"flow_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    urls = [cluster.url_for(0, name), cluster.url_for(1, name)]
    engines = [make_engine(url) for url in urls]
    init_schema(engines[0])
    n = 40
    add_goods(engines[0], 1, stock=100, sales=50)
    for i in range(1, n + 1):
        add_order(engines[0], i)
    for i in range(1, n + 1):
        request_cancel(engines[i % 2], i)  # merchants write on either node
    clock = Clock()
    config = test_config(urls[0])
    runners = [
        Runner(engine, config, build_stages(config), sandbox.gateway, clock=clock, owner=f"node{k + 1}")
        for k, engine in enumerate(engines)
    ]
    errors: list[BaseException] = []

    def drive(runner) -> None:
        try:
            for _ in range(30):
                runner.run_until_idle(clock.now)
        except BaseException as exc:  # noqa: BLE001 - reported below: a crash is a failure of this test
            errors.append(exc)

    try:
        for _ in range(20):
            threads = [threading.Thread(target=drive, args=(r,)) for r in runners]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            pending = scalar(
                engines[0], "SELECT COUNT(*) FROM goods_order2 WHERE sales_success = 0 OR stock_success = 0"
            )
            if not pending:
                break
            clock.advance(5)
        assert {no: c for no, c in sandbox.emulator.refunds_created.items() if c != 1} == {}
        assert len(sandbox.emulator.refunds_created) == n
        assert scalar(engines[1], "SELECT COUNT(*) FROM goods_order2 WHERE refund_status = 'REFUNDED'") == n
        dup = rows(
            engines[0],
            "SELECT order_id, event, COUNT(*) AS c FROM goods_order2_oplog GROUP BY order_id, event HAVING c > 1",
        )
        assert dup == []
        goods = rows(engines[1], "SELECT stock, sales FROM goods WHERE id = 1")[0]
        assert (goods["stock"], goods["sales"]) == (100 + n, 50 - n)
    finally:
        for r in runners:
            r.close()
        for e in engines:
            e.dispose()


class PausedApplier:
    """A node that lags: FLUSH TABLES WITH READ LOCK on it pauses its applier (and desyncs it), so the
    cluster's writes reach it only once the lock is released."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, wsrep_sync_wait=0)
        self.conn = self.engine.connect()
        self.conn.execute(text("FLUSH TABLES WITH READ LOCK"))

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute(text("UNLOCK TABLES"))
            self.conn.close()
            self.conn = None
        self.engine.dispose()


def running_on(url: str, marker: str) -> int:
    """How many statements containing `marker` the node is running now (a session waiting counts)."""
    return fetch(
        url,
        f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE '%{marker}%'"
        f" AND INFO NOT LIKE '%PROCESSLIST%'",
        sync=False,
    )[0][0]


def test_on_a_lagging_node_the_daemons_sessions_wait_for_the_clusters_latest_write_instead_of_reading_it_stale(
    galera_cluster,
):
    cluster = galera_cluster
    name = f"sync_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    first, second = cluster.url_for(0, name), cluster.url_for(1, name)
    writer, daemon_like, unsynced = make_engine(first), make_engine(second), make_engine(second, wsrep_sync_wait=0)
    try:
        with writer.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INT PRIMARY KEY)"))
        with daemon_like.connect() as conn:
            assert conn.execute(text("SELECT @@session.wsrep_sync_wait")).scalar() == 3  # the default
        lag = PausedApplier(second)
        try:
            with writer.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (1)"))  # committed by the cluster, not applied on node 2
            with unsynced.connect() as conn:
                assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar() == 0  # the lag is real: a stale read
            seen: list[int] = []
            reader = threading.Thread(
                target=lambda: seen.append(scalar(daemon_like, "SELECT COUNT(*) AS waits_here FROM t"))
            )
            reader.start()
            wait_until(lambda: running_on(second, "waits_here"), 30, "the daemon's read waiting on node 2")
            assert seen == []  # it waits rather than answer from the stale node
        finally:
            lag.release()
        reader.join(30)
        assert seen == [1]
    finally:
        for e in (writer, daemon_like, unsynced):
            e.dispose()


def test_a_survivor_on_a_lagging_node_does_not_take_over_from_a_process_that_beat_on_another_node(galera_cluster):
    """The reaper reads heartbeats: on a node that has not applied a live process's latest beat, a stale
    read would see it silent past takeover_seconds. It must wait for the beat, and reap nothing."""
    from cancel_scanner.engine.registry import Registry
    from cancel_scanner.models import refund_order

    cluster = galera_cluster
    name = f"reap_{uuid.uuid4().hex[:8]}"
    cluster.create_database(name)
    first, second = cluster.url_for(0, name), cluster.url_for(1, name)
    a, b = make_engine(first), make_engine(second)
    init_schema(a)
    clock = Clock()
    leases = [(refund_order.c.lease_owner, refund_order.c.lease_until)]
    alive = Registry(a, clock, leases, owner="alive-on-node1")
    survivor = Registry(b, clock, leases, owner="survivor-on-node2")
    try:
        alive.beat()
        survivor.beat()
        lag = PausedApplier(second)
        try:
            clock.advance(9)
            alive.beat()  # node 2 has not applied this one
            clock.advance(2)  # 11 s after the first beat, 2 s after the second: alive
            reaped: list[list[str]] = []
            reaper = threading.Thread(target=lambda: reaped.append(survivor.reap()))
            reaper.start()
            wait_until(lambda: running_on(second, "cancel_scanner_process"), 30, "the reaper's read waiting on node 2")
        finally:
            lag.release()
        reaper.join(30)
        assert reaped == [[]]
        assert sorted(r[0] for r in fetch(first, "SELECT owner FROM cancel_scanner_process")) == [
            "alive-on-node1",
            "survivor-on-node2",
        ]
    finally:
        a.dispose()
        b.dispose()


def test_a_node_without_a_binary_log_is_refused_before_anything_is_written(tmp_path):
    """MariaDB's binlog emulation (a Galera node with log_bin OFF) replicates rows that ROLLBACK TO
    SAVEPOINT undid, and every batch may roll back to a savepoint. The daemon must not use such a
    node at all: no connection, one readable line for the operator, the merchant's request untouched."""
    from sqlalchemy.exc import OperationalError

    from cancel_scanner.engine.db import UNSAFE_NODE_CODE
    from cancel_scanner.engine.errors import describe_db_error, mysql_code
    from cancel_scanner.engine.schema_file import schema_sql, split_sql
    from testsupport import galera
    from testsupport.mariadb import MariaDBUnavailable
    from testsupport.processes import run_cli

    if galera.missing():
        pytest.fail(f"the Galera test bed needs {galera.missing()}", pytrace=False)
    try:
        node = galera.GaleraCluster.started(1, base_dir=tmp_path / "bed", name="cs-nobin", log_bin=False)
    except MariaDBUnavailable as exc:
        pytest.fail(f"a one-node cluster did not come up: {exc}", pytrace=False)
    try:
        node.create_database("shop")
        raw = node.nodes[0].connect("shop")
        try:
            with raw.cursor() as cur:
                for stmt in split_sql(schema_sql()):
                    cur.execute(stmt)
                cur.execute(
                    "INSERT INTO req_order_ops (order_id, op_type, operator) VALUES (7, 'MERCHANT_CANCEL', 'ops')"
                )
            raw.commit()
        finally:
            raw.close()
        url = node.url_for(0, "shop")

        engine = make_engine(url)
        try:
            with pytest.raises(OperationalError) as refused:
                engine.connect()
        finally:
            engine.dispose()
        assert mysql_code(refused.value) == UNSAFE_NODE_CODE
        assert "log_bin" in describe_db_error(refused.value)

        config = tmp_path / "jobs.yaml"
        config.write_text(f"database_url: {url}\nwechat: {{mode: sandbox}}\n")
        done = run_cli(["run", "--once"], config=config, cwd=tmp_path, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"})
        assert done.returncode == 1, done.stderr
        said = [line for line in done.stderr.splitlines() if line.startswith("cancel-scanner:")]
        assert len(said) == 1 and "without a binary log (log_bin OFF)" in said[0], done.stderr
        assert "Traceback" not in done.stderr

        raw = node.nodes[0].connect("shop")
        try:
            with raw.cursor() as cur:
                cur.execute("SELECT scanned, result_code FROM req_order_ops")
                assert cur.fetchall() == ((0, None),)
        finally:
            raw.close()
    finally:
        node.stop()
