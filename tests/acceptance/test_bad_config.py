"""Bad configuration and secrets, as an operator meets them at the command line.

Every configuration error exits 2 with exactly one line on stderr that names the key, for
`initdb` and for `run` alike, and touches nothing. The APIv3 key and the merchant private key
never show up: not in a DEBUG log of a daemon doing real refunds, not in any error message.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from cancel_scanner.gateway.keys import KeyMaterial, generate_key_material
from tests.acceptance import harness
from tests.gateway_fixtures import session_keys_in
from testsupport import processes, shop
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql

PEM_SLICE_CHARS = 40
UNKNOWN_THREAD_ID = 1094  # MariaDB's answer to KILL of a session that has ended


def pem_body(pem: str) -> str:
    return "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))


def secret_slices(keys: KeyMaterial) -> list[str]:
    """The APIv3 key and every 40-character slice (in steps of 8) of the merchant private key's base64 body."""
    body = pem_body(keys.merchant_private_key_pem)
    return [keys.apiv3_key] + [body[i : i + PEM_SLICE_CHARS] for i in range(0, len(body) - PEM_SLICE_CHARS, 8)]


def leaked(output: str, keys: KeyMaterial) -> list[str]:
    return [s[:6] + "..." for s in secret_slices(keys) if s in output]


@pytest.fixture
def keys(tmp_path) -> KeyMaterial:
    return session_keys_in(tmp_path / "keys")


def live_config(database_url: str, keys: KeyMaterial) -> dict[str, Any]:
    """A valid live-mode jobs.yaml; nothing listens at base_url, and no case here gets that far."""
    paths = keys.paths
    assert paths is not None
    return {
        "database_url": database_url,
        "wechat": {
            "mode": "live",
            "base_url": "http://127.0.0.1:9",
            "mchid": keys.mchid,
            "appid": keys.appid,
            "merchant_serial_no": keys.merchant_serial_no,
            "merchant_private_key_file": str(paths.merchant_private_key),
            "platform_public_key_file": str(paths.platform_public_key),
            "platform_public_key_id": keys.platform_public_key_id,
            "timeout_seconds": [1, 1],
        },
        "jobs": {"intake": {"interval_seconds": 0.5}},
    }


def _set(path: str, value: Any) -> Callable[[dict, Path, KeyMaterial], dict]:
    def mutate(cfg: dict, _tmp: Path, _keys: KeyMaterial) -> dict:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        return cfg

    return mutate


def _not_a_key(cfg: dict, tmp: Path, keys: KeyMaterial) -> dict:
    # The real key with its last body line cut off: most of the secret is in the file, and it is no key.
    lines = keys.merchant_private_key_pem.splitlines()
    broken = tmp / "broken_key.pem"
    broken.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n", encoding="utf-8")
    cfg["wechat"]["merchant_private_key_file"] = str(broken)
    return cfg


def _sandbox(cfg: dict, _tmp: Path, _keys: KeyMaterial) -> dict:
    cfg["wechat"] = {"mode": "sandbox"}
    return cfg


# id, mutation of the good config (or raw file text), environment change, the key the line must name, commands
CASES = [
    ("unknown top-level key", _set("databse_url", "sqlite:///x.db"), {}, "databse_url", ("initdb", "run")),
    ("unknown job key", _set("jobs.intake.batch_sise", 50), {}, "jobs.intake.batch_sise", ("initdb", "run")),
    (
        "unknown stage",
        _set("jobs.refund_everything", {"enabled": True}),
        {},
        "jobs.refund_everything",
        ("initdb", "run"),
    ),
    (
        "wrong type",
        _set("jobs.submit_refund.concurrency", "sixteen"),
        {},
        "jobs.submit_refund.concurrency",
        ("initdb", "run"),
    ),
    ("wrong shape", _set("wechat.timeout_seconds", 5), {}, "wechat.timeout_seconds", ("initdb", "run")),
    (
        "missing private key file",
        _set("wechat.merchant_private_key_file", "/nonexistent/apiclient_key.pem"),
        {},
        "wechat.merchant_private_key_file",
        ("initdb", "run"),
    ),
    (
        "missing platform key file",
        _set("wechat.platform_public_key_file", "missing_pub_key.pem"),
        {},
        "wechat.platform_public_key_file",
        ("initdb", "run"),
    ),
    (
        "plain http to a remote host",
        _set("wechat.base_url", "http://api.mch.weixin.qq.com"),
        {},
        "wechat.base_url",
        ("initdb", "run"),
    ),
    ("sandbox on MySQL without CANCEL_SCANNER_ALLOW_SANDBOX", _sandbox, {}, "wechat.mode", ("initdb", "run")),
    ("no APIv3 key in live mode", None, {"WECHATPAY_APIV3_KEY": None}, "WECHATPAY_APIV3_KEY", ("initdb", "run")),
    ("APIv3 key of the wrong length", None, {"WECHATPAY_APIV3_KEY": "SHORT"}, "WECHATPAY_APIV3_KEY", ("initdb", "run")),
    ("invalid YAML", "database_url: [unclosed\nwechat: {mode: live\n", {}, "bad.yaml", ("initdb", "run")),
    ("a YAML list, not a mapping", "- database_url\n- wechat\n", {}, "<top level>", ("initdb", "run")),
    (
        "unsupported database",
        _set("database_url", "postgresql://shop@127.0.0.1/shop"),
        {},
        "database_url",
        ("initdb", "run"),
    ),
    # The status page and /metrics off loopback without a key (issue 24): refused before anything starts.
    (
        "monitoring on every address without a token",
        _set("monitoring.listen", "0.0.0.0:9108"),
        {},
        "monitoring.listen",
        ("initdb", "run"),
    ),
    (
        "a monitoring token in the file",
        _set("monitoring.token", "a-token-in-the-file-0001"),
        {},
        "monitoring.token",
        ("initdb", "run"),
    ),
    (
        "a monitoring token too short to be a key",
        _set("monitoring.listen", "0.0.0.0:9108"),
        {"CANCEL_SCANNER_MONITORING_TOKEN": "short"},
        "CANCEL_SCANNER_MONITORING_TOKEN",
        ("initdb", "run"),
    ),
    # initdb needs no gateway and rightly succeeds here; `run` must refuse.
    ("private key file that is not a key", _not_a_key, {}, "wechat.merchant_private_key_file", ("run",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_configuration_error_exits_2_with_one_line_naming_the_key(case, tmp_path, mysql_url, keys):
    name, mutate, env_change, key, commands = case
    path = tmp_path / "bad.yaml"
    if isinstance(mutate, str):
        path.write_text(mutate, encoding="utf-8")
    else:
        cfg = copy.deepcopy(live_config(mysql_url, keys))
        processes.write_config(path, mutate(cfg, tmp_path, keys) if mutate else cfg)
    env = {"WECHATPAY_APIV3_KEY": keys.apiv3_key}
    for k, v in env_change.items():
        if v is None:
            env.pop(k)
        elif v == "SHORT":
            env[k] = keys.apiv3_key[:31]  # one byte short: and this must not be echoed either
        else:
            env[k] = v

    for command in commands:
        done = processes.run_cli([command], config=path, env=env, cwd=tmp_path, timeout=60)
        lines = done.stderr.splitlines()
        assert done.returncode == 2, (command, done.returncode, done.stderr[-2000:])
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith("cancel-scanner: configuration error: "), lines[0]
        assert key in lines[0], (key, lines[0])
        assert done.stdout == ""
        output = done.stdout + done.stderr
        assert leaked(output, keys) == [], lines[0]
        assert keys.apiv3_key[:31] not in output
    # Refused means refused: the (fresh) database got not a single table.
    assert table_count(mysql_url) == 0


def table_count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()")
            ).scalar()
    finally:
        engine.dispose()


def test_secrets_never_reach_a_debug_log_or_an_error_message(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    """A daemon at --log-level DEBUG refunds real orders against the emulator: the APIv3 key and the merchant
    private key appear nowhere in its output. Then a merchant key WeChat does not know: the refunds fail
    with a readable reason, and still no secret in the output."""
    emu = external_emulators(tmp_path / "keys")
    shop.insert_goods(mysql_db, {1: (100, 1000)})
    orders = [shop.order_row(i, quantity=1, amount=1000 + i, paid=i % 5 != 0) for i in range(1, 31)]
    shop.insert_orders(mysql_db, orders)
    baseline = harness.Baseline.take(mysql_db)
    daemon = daemons(
        tmp_path / "debug", harness.daemon_config(mysql_url, emu, log_level="DEBUG"), emu.env(), log_level="DEBUG"
    )
    daemon.start()
    shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "secret test") for o in orders])
    harness.wait_settled(mysql_db, 60, [daemon])
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    harness.check_invariants(mysql_db, emu, harness.Scenario("debug log", baseline, daemons=[daemon]))

    records = daemon.logs()
    output = daemon.log_text()
    paid = sum(1 for o in orders if o["pay"])
    assert (
        sum(
            1
            for r in records
            if r["level"] == "DEBUG" and r.get("component") == "gateway" and r.get("action") == "apply"
        )
        >= paid
    )
    assert leaked(emu.keys.merchant_private_key_pem, emu.keys)  # the detector does find the key where it is
    assert leaked(output, emu.keys) == []
    assert emu.keys.apiv3_key not in daemon.config_path.read_text(encoding="utf-8")

    # The same shop with a merchant key WeChat has never seen.
    stranger = generate_key_material(tmp_path / "stranger")
    shop.insert_orders(mysql_db, [shop.order_row(i, amount=500) for i in range(101, 104)])
    shop.insert_requests(mysql_db, [(i, "MERCHANT_CANCEL", "clerk", "wrong key") for i in range(101, 104)])
    cfg = harness.daemon_config(
        mysql_url,
        emu,
        log_level="DEBUG",
        wechat={"merchant_private_key_file": str(stranger.paths.merchant_private_key)},
    )
    once = processes.run_cli(
        ["--log-json", "--log-level", "DEBUG", "run", "--once"],
        config=processes.write_config(tmp_path / "stranger.yaml", cfg),
        env=emu.env(),
        cwd=tmp_path,
        timeout=120,
    )
    # Credentials refused are no row's fault: the stage stops with the reason, and every refund
    # waits, untouched, for the key to be fixed (then it goes through without a requeue).
    assert once.returncode == 1, once.stderr[-2000:]
    assert "run --once stopped" in once.stderr and "SIGN_ERROR" in once.stderr
    waiting = harness.q_rows(
        mysql_db, "SELECT submit_scanned, submit_success, attempts, last_error FROM refund_order WHERE order_id > 100"
    )
    assert len(waiting) == 3
    assert all((r["submit_scanned"], r["submit_success"]) == (0, 0) for r in waiting)
    assert any(r["last_error"] and r["last_error"].startswith("SIGN_ERROR") for r in waiting)
    assert '"config_alert"' in once.stderr  # the operator is told to check keys, serial, mchid and clock
    for material in (emu.keys, stranger):
        assert leaked(once.stdout + once.stderr, material) == []


def test_a_lease_too_short_for_the_gateway_timeouts_is_refused_or_still_works(
    tmp_path, mysql_db, mysql_url, external_emulators
):
    """lease_seconds 6 with timeout_seconds [1, 1]: either `run --once` refuses it (exit 2 naming the key) or the
    refunds still get submitted. What an operator must never get is a daemon that silently never calls WeChat."""
    import subprocess

    emu = external_emulators(tmp_path / "keys")
    shop.insert_goods(mysql_db, {1: (100, 1000)})
    shop.insert_orders(mysql_db, [shop.order_row(i) for i in range(1, 4)])
    shop.insert_requests(mysql_db, [(i, "MERCHANT_CANCEL", "ops", "short lease") for i in range(1, 4)])
    config = harness.daemon_config(
        mysql_url, emu, jobs={"submit_refund": {"lease_seconds": 6, "interval_seconds": 0.3}}
    )
    path = processes.write_config(tmp_path / "short-lease.yaml", config)
    try:
        done = processes.run_cli(["run", "--once"], config=path, env=emu.env(), cwd=tmp_path, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("run --once was still spinning after 20 s (3 requests, a healthy gateway)")
    if done.returncode == 2:
        assert done.stderr.count("\n") == 1 and "jobs.submit_refund.lease_seconds" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1") == 3


@pytest.mark.parametrize("log_format", ["--no-log-json", "--log-json"])
def test_a_rejected_database_password_appears_in_no_output_at_any_level(tmp_path, mysql_db, mysql_url, log_format):
    """A password rotation: the server refuses the one in the file. Every command says why in one
    line and exits non-zero; the password is nowhere, not even at DEBUG with tracebacks."""
    from sqlalchemy.engine import make_url

    url = make_url(mysql_url)
    user, password = "rotated", "Pw-4f9c2e81d7-rotated"
    with mysql_db.begin() as conn:
        conn.execute(text(f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY 'the-new-one'"))
    wrong = url.set(username=user, password=password).render_as_string(hide_password=False)
    config = processes.write_config(tmp_path / "rotated.yaml", {"database_url": wrong, "wechat": {"mode": "sandbox"}})
    env = {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}
    try:
        for args in (["run", "--once"], ["status"], ["initdb"], ["requeue", "intake", "1"]):
            done = processes.run_cli(
                [log_format, "--log-level", "DEBUG", *args], config=config, env=env, cwd=tmp_path, timeout=60
            )
            output = done.stdout + done.stderr
            assert done.returncode == 1, (args, output[-2000:])
            assert "Access denied" in output, (args, output[-2000:])
            assert password not in output and password[3:15] not in output, args
    finally:
        with mysql_db.begin() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))


def kill_session(conn, pid: int) -> None:
    """KILL one server session, as a DBA does; one that ended since it was listed is gone already."""
    try:
        conn.execute(text(f"KILL {int(pid)}"))
    except OperationalError as exc:
        if exc.orig.args[0] != UNKNOWN_THREAD_ID:
            raise


@pytest.mark.parametrize("log_format", ["--no-log-json", "--log-json"])
def test_a_password_rotated_under_a_running_daemon_never_shows_in_its_debug_output(
    tmp_path, mysql_db, mysql_url, daemons, log_format
):
    """The daemon runs; the DBA rotates its password and kills its sessions. Every reconnect is
    refused: the daemon says so and keeps trying, and the old password appears nowhere."""
    from sqlalchemy.engine import make_url

    url = make_url(mysql_url)
    user, old, new = "rotating", "Pw-old-93b1f0c2aa", "Pw-new-5d7e11c0bb"
    with mysql_db.begin() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{old}'"))
        conn.execute(text(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'"))
    shop_url = url.set(username=user, password=old).render_as_string(hide_password=False)
    config = {"database_url": shop_url, "wechat": {"mode": "sandbox"}, "jobs": {"intake": {"interval_seconds": 0.2}}}
    daemon = daemons(
        tmp_path / "rotating",
        config,
        {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"},
        log_level="DEBUG",
        args=(log_format, "run"),
    )
    try:
        daemon.start()
        wait_until(
            daemon.log_text, 30, "the daemon running", until=lambda t: "cancel-scanner running" in t, daemons=[daemon]
        )
        with mysql_db.begin() as conn:
            conn.execute(text(f"ALTER USER '{user}'@'%' IDENTIFIED BY '{new}'"))
            for (pid,) in conn.execute(
                text("SELECT id FROM information_schema.processlist WHERE user = :u"), {"u": user}
            ):
                kill_session(conn, pid)
        wait_until(
            daemon.log_text,
            60,
            "the refused reconnect reported",
            until=lambda t: "Access denied" in t,
            daemons=[daemon],
        )
        daemon.sigterm()
        assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 5) == 0
        output = daemon.log_text()
        assert old not in output and old[3:14] not in output
    finally:
        if daemon.alive:
            daemon.kill9()
        with mysql_db.begin() as conn:
            conn.execute(text(f"DROP USER IF EXISTS '{user}'@'%'"))
