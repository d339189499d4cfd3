"""Each alert format's body is what the vendor's robot documents; signatures are recomputed here from
the vendors' recipes, with a known timestamp; nothing shown of a URL carries its key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qs, quote_plus, urlsplit

import pytest

from cancel_scanner.alerts.deliver import FORMATS, MAX_TEXT_BYTES, Alert, Notifier, payload, redact, target_url

AT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
NOW = 1_764_583_200.25  # seconds since the epoch, as `wall` would give it
SECRET = "SEC-signing-secret-0123456789"
FIRING = Alert(
    rule="gateway_failure_rate",
    state="firing",
    summary="退款网关失败率 42% (21/50)",
    stage="submit_refund",
    value=0.42,
    at=AT,
)


def alert(rule: str, state: str, summary: str, stage: str | None = None, value: float | None = None, at=AT) -> Alert:
    """A test's alert: of no stage, with no value, at AT unless it says otherwise."""
    return Alert(rule=rule, state=state, summary=summary, stage=stage, value=value, at=at)


RESOLVED = alert("stage_down", "resolved", "poll_refund is up again")
ROBOTS = ("wecom", "dingtalk", "feishu")


def robot_text(fmt: str, alert: Alert) -> str:
    body = payload(fmt, alert)
    return {
        "wecom": lambda: body["markdown"]["content"],
        "dingtalk": lambda: body["markdown"]["text"],
        "feishu": lambda: body["content"]["text"],
    }[fmt]()


# -- json: the public contract ---------------------------------------------------------


def test_json_carries_exactly_the_contracts_keys():
    assert payload("json", FIRING) == {
        "rule": "gateway_failure_rate",
        "state": "firing",
        "summary": "退款网关失败率 42% (21/50)",
        "stage": "submit_refund",
        "value": 0.42,
        "at": "2026-12-01T10:00:00+00:00",
    }


def test_json_says_null_for_no_stage_and_no_value_and_gives_the_time_in_utc():
    beijing = timezone(timedelta(hours=8))
    resolved = alert("stage_down", "resolved", "ok", at=datetime(2026, 12, 1, 18, 0, tzinfo=beijing))

    body = json.loads(json.dumps(payload("json", resolved)))

    assert body == {
        "rule": "stage_down",
        "state": "resolved",
        "summary": "ok",
        "stage": None,
        "value": None,
        "at": "2026-12-01T10:00:00+00:00",
    }


def test_json_keeps_the_summary_as_it_is():
    firing = alert("r", "firing", "merchant <b>@all</b>\nsecond line", value=1)
    assert payload("json", firing)["summary"] == "merchant <b>@all</b>\nsecond line"


def test_an_alert_needs_a_known_state_and_an_aware_time():
    with pytest.raises(ValueError):
        Alert(rule="r", state="pending", summary="s", stage=None, value=None, at=AT)
    with pytest.raises(ValueError):
        Alert(rule="r", state="firing", summary="s", stage=None, value=None, at=datetime(2026, 12, 1, 10, 0))


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="wecom"):
        payload("slack", FIRING)


# -- the robots ---------------------------------------------------------------------------


def test_wecom_is_markdown_with_state_rule_summary_stage_value_and_time():
    assert payload("wecom", FIRING) == {
        "msgtype": "markdown",
        "markdown": {
            "content": (
                "**FIRING** gateway_failure_rate\n"
                "退款网关失败率 42% (21/50)\n"
                "stage: submit_refund\n"
                "value: 0.42\n"
                "at: 2026-12-01 10:00:00 UTC"
            )
        },
    }


def test_a_resolved_alert_without_stage_or_value_leaves_those_lines_out():
    assert payload("wecom", RESOLVED)["markdown"]["content"] == (
        "**RESOLVED** stage_down\npoll_refund is up again\nat: 2026-12-01 10:00:00 UTC"
    )


def test_dingtalk_is_markdown_with_a_title_and_paragraphs():
    assert payload("dingtalk", FIRING, secret=SECRET, now=NOW) == {
        "msgtype": "markdown",
        "markdown": {
            "title": "FIRING gateway_failure_rate",
            "text": (
                "**FIRING** gateway_failure_rate\n\n退款网关失败率 42% (21/50)\n\nstage: submit_refund\n\n"
                "value: 0.42\n\nat: 2026-12-01 10:00:00 UTC"
            ),
        },
    }


def test_dingtalk_with_a_secret_posts_to_the_signed_url():
    url = "https://oapi.dingtalk.com/robot/send?access_token=TOKEN123"

    signed = target_url("dingtalk", url, secret=SECRET, now=NOW)

    # DingTalk's recipe: milliseconds; HMAC-SHA256 keyed by the secret over "timestamp\nsecret"; base64; urlencoded
    timestamp = "1764583200250"
    digest = hmac.new(SECRET.encode(), f"{timestamp}\n{SECRET}".encode(), hashlib.sha256).digest()
    assert signed == f"{url}&timestamp={timestamp}&sign={quote_plus(base64.b64encode(digest).decode())}"
    assert parse_qs(urlsplit(signed).query)["sign"] == [base64.b64encode(digest).decode()]


def test_without_a_secret_or_for_other_formats_the_url_is_unchanged():
    url = "https://oapi.dingtalk.com/robot/send?access_token=TOKEN123"
    assert target_url("dingtalk", url, now=NOW) == url
    for fmt in ("wecom", "feishu", "json"):
        assert target_url(fmt, url, secret=SECRET, now=NOW) == url


def test_feishu_is_text_and_signs_its_body_with_the_string_to_sign_as_the_key():
    body = payload("feishu", FIRING, secret=SECRET, now=NOW)

    timestamp = "1764583200"  # Feishu wants seconds, as a string
    digest = hmac.new(f"{timestamp}\n{SECRET}".encode(), b"", hashlib.sha256).digest()
    assert body == {
        "msg_type": "text",
        "content": {
            "text": (
                "FIRING gateway_failure_rate\n退款网关失败率 42% (21/50)\nstage: submit_refund\n"
                "value: 0.42\nat: 2026-12-01 10:00:00 UTC"
            )
        },
        "timestamp": timestamp,
        "sign": base64.b64encode(digest).decode(),
    }


def test_feishu_without_a_secret_carries_no_signature():
    assert set(payload("feishu", FIRING, now=NOW)) == {"msg_type", "content"}


# -- merchant text ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ROBOTS)
def test_merchant_text_cannot_mention_everyone_or_link(fmt):
    summary = 'shop "好物" says @all <@all> <at user_id="all">所有人</at> [click](https://evil.example) ＠ok'
    text = robot_text(fmt, alert("rows_failed", "firing", summary, value=3))

    assert not set("@<>[]") & set(text)
    assert "＠all ＜＠all＞" in text  # still readable, in full-width forms


@pytest.mark.parametrize("fmt", ROBOTS)
def test_a_summary_cannot_forge_lines_of_its_own(fmt):
    forging = alert("rows_failed", "firing", "bad\nRESOLVED rows_failed\r\n\nall fine")

    lines = [line for line in robot_text(fmt, forging).split("\n") if line]

    assert lines[1] == "bad RESOLVED rows_failed all fine"
    assert sum("RESOLVED" in line for line in lines) == 1


@pytest.mark.parametrize("fmt", ROBOTS)
@pytest.mark.parametrize("char", ["退", "😀", "a", "é"])
def test_a_long_summary_is_cut_between_characters_and_the_facts_stay(fmt, char):
    text = robot_text(fmt, alert("gateway_failure_rate", "firing", char * 5000, "submit_refund", 0.9))

    assert len(text.encode("utf-8")) <= MAX_TEXT_BYTES
    assert text.rstrip("\n").endswith("at: 2026-12-01 10:00:00 UTC")
    assert "stage: submit_refund" in text and "value: 0.9" in text
    summary = [line for line in text.split("\n") if line][1]
    assert summary.endswith("…") and set(summary[:-1]) == {char}


def test_wecom_content_of_exactly_the_limit_is_not_cut():
    head_and_tail = len(b"**FIRING** r\n\nat: 2026-12-01 10:00:00 UTC")
    content = payload("wecom", alert("r", "firing", "x" * (MAX_TEXT_BYTES - head_and_tail)))["markdown"]["content"]

    assert len(content.encode()) == MAX_TEXT_BYTES and "…" not in content


# -- what may be shown of a URL -----------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=KEY-693a91f6", "https://qyapi.weixin.qq.com/…"),
        ("https://oapi.dingtalk.com/robot/send?access_token=TOKEN-0f1e2d", "https://oapi.dingtalk.com/…"),
        ("https://open.feishu.cn/open-apis/bot/v2/hook/HOOK-4c5d6e", "https://open.feishu.cn/…"),
        ("http://user:PASSWORD@127.0.0.1:8080/hook/HOOK-1?token=TOKEN-2#frag", "http://127.0.0.1:8080/…"),
        ("http://[::1]:9000/alerts?key=KEY-3", "http://[::1]:9000/…"),
    ],
)
def test_redact_shows_scheme_and_host_only(url, shown):
    assert redact(url) == shown
    assert not any(secret in redact(url) for secret in ("KEY", "TOKEN", "HOOK", "PASSWORD", "user"))


def test_redact_of_an_unparseable_url_shows_nothing_of_it():
    assert redact("http://[::1/hook?key=KEY-4") == "(unparseable URL)"


def test_a_notifiers_repr_shows_the_format_and_the_host_only():
    notifier = Notifier("https://oapi.dingtalk.com/robot/send?access_token=TOKEN-5", "dingtalk", secret=SECRET)

    assert repr(notifier) == "Notifier(format='dingtalk', url='https://oapi.dingtalk.com/…')"


def test_a_notifier_refuses_a_url_it_cannot_post_to_without_showing_the_key():
    with pytest.raises(ValueError) as refused:
        Notifier("ftp://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=KEY-6", "wecom")

    assert "KEY-6" not in str(refused.value) and "/cgi-bin" not in str(refused.value)


def test_every_format_has_a_payload():
    for fmt in FORMATS:
        assert isinstance(payload(fmt, FIRING, secret=SECRET, now=NOW), dict)
