"""Fixtures shared by every test: the databases (SQLite and a real MariaDB) and the gateway.

MariaDB comes from ``testsupport.mariadb`` (a throwaway server started once per session),
or from ``CANCEL_SCANNER_TEST_MYSQL_URL``. Without one, MariaDB tests skip locally and
FAIL under ``CI=true``: a green CI must have run them.
"""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cancel_scanner.engine.db import init_schema, make_engine

pytest_plugins = ["tests.gateway_fixtures"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ENV_MYSQL_URL = "CANCEL_SCANNER_TEST_MYSQL_URL"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (scripts/test): twice the cores. Most of a test's time is spent waiting on MariaDB,
    a daemon in a subprocess, an HTTP round trip or a browser, not on this process's CPU."""
    return 2 * len(os.sched_getaffinity(0))


# The Galera tests share the session's one cluster (half a minute to start): one worker runs them all.
# Their modules also carry pytest.mark.xdist_group("galera"), which --dist loadgroup alone would honour,
# but pytest-xdist 3.8 marks a group by rewriting item._nodeid, which pytest 9 no longer reads; so the
# scheduler below groups them by module.
GALERA_MODULES = ("tests/acceptance/test_galera_cluster.py", "tests/integration/test_galera.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GaleraTogether(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "galera" if nodeid.split("::")[0] in GALERA_MODULES else super()._split_scope(nodeid)

    return GaleraTogether(config, log)


def pytest_collection_modifyitems(config, items):
    loose = [
        item.nodeid
        for item in items
        if item.get_closest_marker("galera") and item.nodeid.split("::")[0] not in GALERA_MODULES
    ]
    if loose:
        raise pytest.UsageError("Galera tests outside tests/conftest.py's GALERA_MODULES: " + ", ".join(loose))
    # Tests marked `alone` last: by then the other workers are on short tests, so the wait for them is short.
    items.sort(key=lambda item: item.get_closest_marker("alone") is not None)


@pytest.fixture(autouse=True)
def _alone_when_marked(request, tmp_path_factory):
    """A test marked ``alone`` runs while no other test of this session runs in another worker: what it
    asserts is a rate (no 429 from the emulator's one-second windows), which the other workers' load on
    a two-core machine would bend without anything being wrong. Every other test holds a shared lock
    for its run; an ``alone`` one takes it exclusively, after a turnstile that stops new tests starting
    meanwhile (flock gives a waiting writer no priority of its own). Nothing to do without pytest-xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # every worker's basetemp is a folder of one run's
    alone = request.node.get_closest_marker("alone") is not None
    with open(shared / "alone.turnstile", "a+") as turnstile, open(shared / "alone.lock", "a+") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"MariaDB is required under CI=true: {reason}", pytrace=False)
    pytest.skip(f"no MariaDB: {reason}")


@pytest.fixture(scope="session")
def mysql_admin_url():
    """A server URL without a database; tests get a fresh database each."""
    if os.environ.get(ENV_MYSQL_URL):
        yield make_url(os.environ[ENV_MYSQL_URL]).set(database="").render_as_string(hide_password=False)
        return
    from testsupport.mariadb import MariaDBServer, MariaDBUnavailable, find_mariadbd

    if find_mariadbd() is None:
        _unavailable("mariadbd not found (install mariadb-server, or set CANCEL_SCANNER_TEST_MYSQL_URL)")
    server = MariaDBServer()
    try:
        server.start()
    except MariaDBUnavailable as exc:
        server.cleanup()
        _unavailable(str(exc).splitlines()[0])
    try:
        yield server.admin_url
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture(scope="session")
def mysql_schemas(mysql_admin_url):
    """Databases holding the schema, built once and reused while a test leaves their schema as built
    (testsupport/schema_pool.py): a fresh database and its 13 tables and view per test cost more."""
    from testsupport.schema_pool import SchemaPool

    def build(url: str) -> None:
        engine = make_engine(url)
        try:
            init_schema(engine)
        finally:
            engine.dispose()

    pool = SchemaPool(mysql_admin_url, build)
    yield pool
    pool.close()


def _wants_schema(request) -> bool:
    return bool({"db", "mysql_db"} & set(request.fixturenames))


@pytest.fixture
def mysql_url(request, mysql_admin_url):
    """A database of its own for the test: holding the schema when the test takes ``db`` or
    ``mysql_db`` (from ``mysql_schemas``), else empty and fresh (initdb, migrate, adoption tests)."""
    if _wants_schema(request):
        pool = request.getfixturevalue("mysql_schemas")
        name = pool.acquire()
        try:
            yield pool.url_for(name)
        finally:
            pool.release(name)
        return
    name = f"cs_{uuid.uuid4().hex[:12]}"
    admin = create_engine(mysql_admin_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        yield make_url(mysql_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'cancel-scanner.db'}"


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def db_url(request):
    """Each test that takes it runs twice: on SQLite and on MariaDB."""
    return request.getfixturevalue(f"{request.param}_url")


def _schema_engine(url):
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        init_schema(engine)  # on MariaDB, mysql_url's database from mysql_schemas holds it already
    yield engine
    engine.dispose()


@pytest.fixture
def db(db_url):
    """An engine on a fresh database holding the schema."""
    yield from _schema_engine(db_url)


@pytest.fixture
def mysql_db(mysql_url):
    """The same on MariaDB only."""
    yield from _schema_engine(mysql_url)


@pytest.fixture
def sandbox(key_material):
    """The emulator and the real WeChat Pay client over HTTP; refunds succeed on their first poll.
    On the session's keys (no test takes both this and the ``emulator`` fixture)."""
    from cancel_scanner.gateway.sandbox import start_sandbox
    from testsupport.emulator_faults import EmulatorFaults

    sb = start_sandbox(
        keys=key_material,
        faults=EmulatorFaults(),
        success_delay=0,
        timeout=(2, 2),
        apply_qps=2000,
        query_qps=2000,
        emulator_apply_qps=None,
        emulator_query_qps=None,
    )
    yield sb
    sb.close()


@pytest.fixture
def world(db, db_url, sandbox):
    from tests.flow import World, test_config

    return World(db=db, config=test_config(db_url), sandbox=sandbox)


@pytest.fixture(scope="session")
def galera_cluster(tmp_path_factory):
    """One three-node Galera cluster for the session (testsupport/galera.py); each test its own database."""
    from testsupport import galera
    from testsupport.mariadb import MariaDBUnavailable

    lacking = galera.missing()
    if lacking:
        if IN_CI:
            pytest.fail(f"a Galera cluster is required under CI=true: {lacking} not found", pytrace=False)
        pytest.skip(f"no Galera cluster: {lacking} not found")
    try:
        bed = galera.GaleraCluster.started(3, base_dir=tmp_path_factory.mktemp("galera"))
    except MariaDBUnavailable as exc:
        if IN_CI:
            pytest.fail(f"the Galera cluster did not come up: {exc}", pytrace=False)
        pytest.skip(f"no Galera cluster: {exc}")
    yield bed
    bed.stop()
