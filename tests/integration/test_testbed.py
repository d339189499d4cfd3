"""The throwaway MariaDB of testsupport/mariadb.py does what the other tests rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pymysql
import pytest
import sqlalchemy as sa

from testsupport.mariadb import MariaDBServer, find_mariadbd
from testsupport.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.mysql


def require_mariadbd() -> None:
    if find_mariadbd() is not None:
        return
    reason = "mariadbd not installed (apt-get install mariadb-server)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI=true, so this fails instead of skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server():
    require_mariadbd()
    with MariaDBServer() as srv:
        yield srv


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. a temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def count_rows(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def test_server_has_own_port_utf8mb4_and_utc(server):
    assert server.port not in (None, 3306)
    assert server.url == f"mysql+pymysql://root@127.0.0.1:{server.port}/cancel_scanner_test?charset=utf8mb4"
    assert server.admin_url == f"mysql+pymysql://root@127.0.0.1:{server.port}/?charset=utf8mb4"
    engine = sa.create_engine(server.url)
    try:
        with engine.begin() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT @@port, @@bind_address, @@datadir, DATABASE(), @@character_set_server,"
                    " @@collation_server, @@global.time_zone, @@session.time_zone,"
                    " TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())"
                )
            ).one()
            assert row[0] == server.port
            assert row[1] == "127.0.0.1"
            assert Path(row[2]).resolve() == server.datadir.resolve()
            assert row[3] == "cancel_scanner_test"
            assert (row[4], row[5]) == ("utf8mb4", "utf8mb4_unicode_ci")
            assert (row[6], row[7]) == ("+00:00", "+00:00")
            assert row[8] == 0
            schema = conn.execute(
                sa.text(
                    "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME"
                    " FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = DATABASE()"
                )
            ).one()
            assert tuple(schema) == ("utf8mb4", "utf8mb4_unicode_ci")
            # 4-byte UTF-8 (emoji in a merchant's cancel reason) survives a round trip
            conn.execute(sa.text("CREATE TABLE t_utf8 (s VARCHAR(20))"))
            conn.execute(sa.text("INSERT INTO t_utf8 VALUES (:s)"), {"s": "退款 🧾"})
            assert conn.execute(sa.text("SELECT s FROM t_utf8")).scalar_one() == "退款 🧾"
            conn.execute(sa.text("DROP TABLE t_utf8"))
    finally:
        engine.dispose()


def database_with_rows(server, name: str, rows: int) -> str:
    """A database of the server holding table t with ids 1..rows, committed."""
    url = server.create_database(name)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB"))
        conn.execute(sa.text("INSERT INTO t VALUES " + ", ".join(f"({i})" for i in range(1, rows + 1))))
    engine.dispose()
    return url


def test_stop_then_start_keeps_data_and_port(server):
    url = database_with_rows(server, "testbed_restart", 3)
    port, pid = server.port, server.pid

    server.stop()
    assert not server.running and server.pid is None
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=2)

    server.start()
    assert server.port == port and server.pid != pid
    assert count_rows(url, "t") == 3
    server.drop_database("testbed_restart")


def test_kill_then_start_recovers_committed_rows(server):
    url = database_with_rows(server, "testbed_crash", 2)
    pid = server.pid

    server.kill()
    assert not server.running
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the killed server's process to be gone")

    server.start()
    assert count_rows(url, "t") == 2
    server.drop_database("testbed_crash")


def test_kill_and_cleanup_leave_no_process_or_files():
    require_mariadbd()
    srv = MariaDBServer()
    try:
        srv.start()
        folder, pid = srv.folder, srv.pid
        assert processes_mentioning(str(folder))  # the server and its watchdog
        srv.kill()
        assert not Path(f"/proc/{pid}").exists()
    finally:
        srv.cleanup()
    assert not folder.exists()
    wait_until(
        lambda: processes_mentioning(str(folder)), 10, "no process mentioning the folder", until=lambda found: not found
    )


def test_server_does_not_outlive_a_killed_test_process():
    """Even a SIGKILLed test process leaves no mariadbd (or temp folder) behind."""
    require_mariadbd()
    script = (
        "import os, signal\n"
        "from testsupport.mariadb import MariaDBServer\n"
        "srv = MariaDBServer().start()\n"
        "print(srv.folder, srv.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    folder, pid = child.stdout.split()
    wait_until(
        lambda: processes_mentioning(folder), 30, "no process mentioning the folder", until=lambda found: not found
    )
    assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    wait_until(lambda: not Path(folder).exists(), 10, "the temp folder to be removed")


def test_the_schema_pool_hands_a_database_back_as_built_and_never_one_whose_schema_a_test_changed(mysql_admin_url):
    """testsupport/schema_pool.py, on which every MariaDB test taking ``db`` or ``mysql_db`` relies:
    a database handed out again has no row a previous test wrote, its AUTO_INCREMENTs start where a
    fresh one's do and its schema rows are the fresh ones; one whose schema changed is dropped."""
    from cancel_scanner.engine.db import init_schema, make_engine
    from testsupport.schema_pool import SchemaPool

    def build(url: str) -> None:
        engine = make_engine(url)
        init_schema(engine)
        engine.dispose()

    def snapshot(engine) -> tuple:
        with engine.connect() as conn:
            counts = {
                t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                for t in ("goods", "goods_order2", "req_order_ops", "refund_order")
            }
            versions = conn.execute(sa.text("SELECT * FROM cancel_scanner_schema ORDER BY version")).all()
        return counts, versions

    pool = SchemaPool(mysql_admin_url, build, prefix="cs_pooltest_")
    try:
        first = pool.acquire()
        engine = sa.create_engine(pool.url_for(first))
        fresh = snapshot(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO goods (id, name, stock, sales) VALUES (1, 'g', 1, 1)"))
            conn.execute(
                sa.text(
                    "INSERT INTO req_order_ops (order_id, op_type) VALUES (1, 'MERCHANT_CANCEL'), (2, 'MERCHANT_CANCEL')"
                )
            )
            conn.execute(sa.text("UPDATE cancel_scanner_schema SET applied_by = 'a test'"))
        pool.release(first)  # the engine's connection is still open: the pool closes it

        again = pool.acquire()
        assert again == first and pool.stats == {"built": 1, "reused": 1, "dropped": 0}
        engine = sa.create_engine(pool.url_for(again))
        assert snapshot(engine) == fresh
        with engine.begin() as conn:
            new_id = conn.execute(
                sa.text("INSERT INTO req_order_ops (order_id, op_type) VALUES (3, 'MERCHANT_CANCEL')")
            ).lastrowid
            assert new_id == 1  # as in a fresh database
            conn.execute(sa.text("ALTER TABLE refund_order DROP INDEX uk_refund_order_out_refund_no"))
        engine.dispose()
        pool.release(again)
        assert pool.stats["dropped"] == 1

        other = pool.acquire()
        assert other != first and pool.stats["built"] == 2
        engine = sa.create_engine(pool.url_for(other))
        counts, versions = snapshot(engine)  # built later: its own applied_at
        assert (counts, [v[:2] for v in versions]) == (fresh[0], [v[:2] for v in fresh[1]])
        engine.dispose()
        pool.release(other)
    finally:
        pool.close()
    admin = sa.create_engine(mysql_admin_url)
    with admin.connect() as conn:
        left = conn.execute(
            sa.text("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'cs_pooltest%'")
        ).all()
    admin.dispose()
    assert left == []
