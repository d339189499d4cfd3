"""Bad configuration is one line naming the key; good configuration is frozen objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from cancel_scanner.config import load_config as _load_config
from cancel_scanner.config import parse_config as _parse_config
from cancel_scanner.engine.config import ConfigError
from cancel_scanner.scanners import REGISTRY
from tests.flow import STAGES_IN_FLOW_ORDER

ROOT = Path(__file__).resolve().parents[2]
NO_ENV: dict[str, str] = {}


def parse_config(raw, **kw):
    return _parse_config(raw, REGISTRY, **kw)


def load_config(path, **kw):
    return _load_config(path, REGISTRY, **kw)


def test_the_shipped_jobs_yaml_is_valid_and_enables_all_six_stages():
    config = load_config(ROOT / "jobs.yaml", env=NO_ENV)
    assert config.wechat.mode == "sandbox"
    assert config.is_sqlite
    assert [j.name for j in config.jobs.values() if j.enabled] == list(STAGES_IN_FLOW_ORDER)
    assert config.job("submit_refund").concurrency == 16
    assert config.job("poll_refund").poll_delays_seconds == (60, 300, 600, 1200, 1800)


def test_a_payment_after_a_cancel_is_refunded_unless_an_operator_turns_it_off():
    """Issue 23, item 3: the order was cancelled and its stock given back: the user paid for nothing."""
    assert load_config(ROOT / "jobs.yaml", env=NO_ENV).reconcile.refund_orphan_payments is True
    assert parse_config({}, env=NO_ENV).reconcile.refund_orphan_payments is True
    assert (
        parse_config({"reconcile": {"refund_orphan_payments": False}}, env=NO_ENV).reconcile.refund_orphan_payments
        is False
    )


def test_config_objects_are_frozen():
    config = parse_config({}, env=NO_ENV)
    with pytest.raises(ValueError, match="frozen"):  # the top-level Config is itself a pydantic model
        config.database_url = "sqlite://"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.jobs["intake"] = None  # type: ignore[index]
    with pytest.raises(ValueError):
        config.job("intake").batch_size = 1


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"databse_url": "sqlite://"}, "databse_url"),
        ({"jobs": {"intake": {"batch_sise": 5}}}, "jobs.intake.batch_sise"),
        ({"jobs": {"refund": {}}}, "jobs.refund"),
        ({"jobs": {"intake": {"batch_size": "many"}}}, "jobs.intake.batch_size"),
        ({"jobs": {"intake": {"batch_size": 0}}}, "jobs.intake.batch_size"),
        ({"jobs": {"intake": {"enabled": "yes please"}}}, "jobs.intake.enabled"),
        ({"jobs": {"intake": {"concurrency": 4}}}, "jobs.intake.concurrency"),
        ({"jobs": {"poll_refund": {"poll_delays_seconds": []}}}, "jobs.poll_refund.poll_delays_seconds"),
        ({"jobs": {"submit_refund": {"retry_delays_seconds": [1, -1]}}}, "jobs.submit_refund.retry_delays_seconds[1]"),
        ({"wechat": {"mode": "prod"}}, "wechat.mode"),
        ({"wechat": {"timeout_seconds": 5}}, "wechat.timeout_seconds"),
        ({"wechat": {"notify_url": "http://shop.example.com/n"}}, "wechat.notify_url"),
        ({"database_url": "mysql+pymysql://u@db.example.com/shop"}, "wechat.mode"),
        ({"database_url": "postgresql://u@h/db"}, "database_url"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"wsrep_sync_wait": 16}, "wsrep_sync_wait"),
        ({"wsrep_sync_wait": "yes"}, "wsrep_sync_wait"),
    ],
)
def test_each_bad_value_names_its_key(raw, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env=NO_ENV)
    assert caught.value.key == key
    assert "\n" not in str(caught.value)


def test_sandbox_on_mysql_is_allowed_only_when_asked_for():
    raw = {"database_url": "mysql+pymysql://u@127.0.0.1/shop"}
    config = parse_config(raw, env={"CANCEL_SCANNER_ALLOW_SANDBOX": "1"})
    assert config.wechat.mode == "sandbox"


def test_database_url_from_the_environment_wins():
    config = parse_config({"database_url": "sqlite:///a.db"}, env={"CANCEL_SCANNER_DB_URL": "sqlite:///b.db"})
    assert config.database_url == "sqlite:///b.db"


def _live(tmp_path, **over):
    key = tmp_path / "apiclient_key.pem"
    pub = tmp_path / "pub_key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    pub.write_text("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n")
    wechat = {
        "mode": "live",
        "merchant_serial_no": "ABC123",
        "merchant_private_key_file": str(key),
        "platform_public_key_file": str(pub),
        "platform_public_key_id": "PUB_KEY_ID_0000",
        **over,
    }
    return {"database_url": "sqlite:///x.db", "wechat": wechat}


GOOD_APIV3 = {"WECHATPAY_APIV3_KEY": "k" * 32}


def test_live_mode_with_keys_and_apiv3_key_is_accepted(tmp_path):
    config = parse_config(_live(tmp_path), env=GOOD_APIV3)
    assert config.wechat.base_url == "https://api.mch.weixin.qq.com"


@pytest.mark.parametrize(
    ("over", "env", "key"),
    [
        ({"merchant_private_key_file": "/nonexistent/key.pem"}, GOOD_APIV3, "wechat.merchant_private_key_file"),
        ({"platform_public_key_file": None}, GOOD_APIV3, "wechat.platform_public_key_file"),
        ({"base_url": "http://pay.example.com"}, GOOD_APIV3, "wechat.base_url"),
        ({}, {}, "WECHATPAY_APIV3_KEY"),
        ({}, {"WECHATPAY_APIV3_KEY": "short"}, "WECHATPAY_APIV3_KEY"),
    ],
)
def test_live_mode_problems_name_their_key(tmp_path, over, env, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(_live(tmp_path, **over), env=env)
    assert caught.value.key == key


def test_plain_http_is_fine_for_a_loopback_gateway(tmp_path):
    config = parse_config(_live(tmp_path, base_url="http://127.0.0.1:8080/"), env=GOOD_APIV3)
    assert config.wechat.base_url == "http://127.0.0.1:8080"


def test_a_wrong_apiv3_key_is_never_echoed(tmp_path):
    secret = "s3cr3t-not-32-bytes"
    with pytest.raises(ConfigError) as caught:
        parse_config(_live(tmp_path), env={"WECHATPAY_APIV3_KEY": secret})
    assert secret not in str(caught.value)


def test_unreadable_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad, env=NO_ENV)
    assert caught.value.key == str(bad)


@pytest.mark.parametrize("host", ["127.0.0.2", "127.1.2.3", "localhost", "[::1]"])
def test_every_loopback_address_the_config_accepts_the_gateway_accepts_too(tmp_path, host, monkeypatch):
    """One rule for "plain http only on loopback": the config and the client used to disagree
    about 127.0.0.2 and blamed the merchant private key."""
    from contextlib import ExitStack

    from cancel_scanner.gateway.keys import generate_key_material
    from cancel_scanner.gateway.wechat_channel import build_gateway

    keys = generate_key_material(tmp_path / "keys")
    raw = {
        "database_url": "sqlite:///x.db",
        "wechat": {
            "mode": "live",
            "base_url": f"http://{host}:8080",
            "mchid": keys.mchid,
            "appid": keys.appid,
            "merchant_serial_no": keys.merchant_serial_no,
            "merchant_private_key_file": str(keys.paths.merchant_private_key),
            "platform_public_key_file": str(keys.paths.platform_public_key),
            "platform_public_key_id": keys.platform_public_key_id,
        },
    }
    monkeypatch.setenv("WECHATPAY_APIV3_KEY", keys.apiv3_key)
    config = parse_config(raw)
    with ExitStack() as stack:
        gateway = build_gateway(config, stack)
        assert f"http://{host}:8080" in repr(gateway)


def test_plain_http_to_another_host_is_refused_naming_the_url_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(_live(tmp_path, base_url="http://10.1.2.3:8080"), env=GOOD_APIV3)
    assert err.value.key == "wechat.base_url"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (
            {"jobs": {"submit_refund": {"retry_delays_seconds": [5, float("inf")]}}},
            "jobs.submit_refund.retry_delays_seconds[1]",
        ),
        ({"jobs": {"poll_refund": {"poll_delays_seconds": [float("inf")]}}}, "jobs.poll_refund.poll_delays_seconds[0]"),
        ({"wechat": {"sandbox": {"success_delay_seconds": float("inf")}}}, "wechat.sandbox.success_delay_seconds"),
    ],
)
def test_an_endless_delay_is_a_configuration_error_not_a_crash_later(raw, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env=NO_ENV)
    assert caught.value.key == key


def test_an_empty_sandbox_section_means_the_defaults():
    assert parse_config({"wechat": {"sandbox": None}}, env=NO_ENV).wechat.sandbox.port == 0


ROBOT_KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"


@pytest.mark.parametrize(
    ("alerts", "key", "words"),
    [
        ({"webhook_url": f"ftp://robot/{ROBOT_KEY}"}, "alerts.webhook_url", "must be an https:// URL"),
        (
            {"webhook_url": f"http://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={ROBOT_KEY}"},
            "alerts.webhook_url",
            "plain http only to a loopback address",
        ),
        ({"format": "slack"}, "alerts.format", "'wecom', 'dingtalk', 'feishu' or 'json'"),
        ({"secret": ROBOT_KEY}, "alerts.secret", "CANCEL_SCANNER_ALERT_SECRET"),
        ({"cooldown_seconds": -1}, "alerts.cooldown_seconds", "greater than or equal to 0"),
        (
            {"rules": {"gateway_failure_rate": {"threshold": 1.5}}},
            "alerts.rules.gateway_failure_rate.threshold",
            "less than",
        ),
        (
            {"rules": {"gateway_failure_rate": {"min_calls": 0}}},
            "alerts.rules.gateway_failure_rate.min_calls",
            "greater",
        ),
        ({"rules": {"page_me": {}}}, "alerts.rules.page_me", "unknown key"),
        (
            {"rules": {"oldest_pending": {"stage_threshold_seconds": {"tidy": 5}}}},
            "alerts.rules.oldest_pending.stage_threshold_seconds",
            "no such stage: tidy",
        ),
    ],
)
def test_a_bad_alerts_section_names_its_key_and_never_shows_the_robots_key(alerts, key, words):
    with pytest.raises(ConfigError) as caught:
        parse_config({"alerts": alerts}, env=NO_ENV)
    assert caught.value.key == key and words in str(caught.value)
    assert ROBOT_KEY not in str(caught.value)


def test_the_webhook_url_and_signing_secret_come_from_the_environment_and_never_show():
    env = {
        "CANCEL_SCANNER_ALERT_WEBHOOK_URL": f"https://oapi.dingtalk.com/robot/send?access_token={ROBOT_KEY}",
        "CANCEL_SCANNER_ALERT_SECRET": "SECdeadbeef",
    }
    config = parse_config({"alerts": {"format": "dingtalk", "rules": {"rows_failed": None}}}, env=env)
    assert config.alerts.webhook_url.endswith(ROBOT_KEY) and config.alerts.secret == "SECdeadbeef"
    assert config.alerts.rules.rows_failed.threshold == 1  # an empty rule: its defaults
    assert ROBOT_KEY not in repr(config) and "SECdeadbeef" not in repr(config)
    assert parse_config({}, env=NO_ENV).alerts.webhook_url is None  # alerts are off by default


@pytest.mark.parametrize(
    "listen, env, allowed",
    [
        ("127.0.0.1:9108", {}, True),
        ("localhost:9108", {}, True),
        ("[::1]:9108", {}, True),
        ("0.0.0.0:9108", {}, False),
        ("10.0.0.5:9108", {}, False),
        ("0.0.0.0:9108", {"CANCEL_SCANNER_MONITORING_TOKEN": "x" * 16}, True),
    ],
)
def test_the_page_and_metrics_off_loopback_need_a_token_or_a_word_saying_no(listen, env, allowed):
    """Issue 24, item 3."""
    raw = {"monitoring": {"listen": listen}}
    if allowed:
        config = parse_config(raw, env=env)
        assert config.monitoring.token == env.get("CANCEL_SCANNER_MONITORING_TOKEN")
        assert "x" * 16 not in repr(config.monitoring)  # never printed
    else:
        with pytest.raises(ConfigError) as refused:
            parse_config(raw, env=env)
        assert refused.value.key == "monitoring.listen" and "CANCEL_SCANNER_MONITORING_TOKEN" in str(refused.value)
        assert (
            parse_config({"monitoring": {"listen": listen, "allow_unauthenticated": True}}, env=env).monitoring.token
            is None
        )
