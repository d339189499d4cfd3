"""Alerts in the operators' language (issue 27): the group robots' messages are Chinese by default (the
daemon passes config.locale), times on Beijing's clock; the json format keeps its keys, rule and state."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cancel_scanner.alerts import rules  # noqa: F401 - the rules' messages are in the catalogs
from cancel_scanner.alerts.deliver import Alert, payload
from cancel_scanner.i18n import Phrase

SUMMARY = Phrase("{n} refund(s) ABNORMAL at WeChat Pay (the user's card frozen or closed): the merchant must act", n=3)
ALERT = Alert("abnormal_refunds", "firing", SUMMARY, "poll_refund", 3, datetime(2026, 12, 7, 12, 0, 5, tzinfo=UTC))


def text_of(fmt: str, body: dict) -> str:
    return {"wecom": lambda: body["markdown"]["content"], "dingtalk": lambda: body["markdown"]["text"]}.get(
        fmt, lambda: body["content"]["text"]
    )()


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk", "feishu"])
def test_the_robots_read_chinese_with_beijing_time_and_english_on_request(fmt):
    zh = text_of(fmt, payload(fmt, ALERT, locale="zh_CN", timezone="Asia/Shanghai"))
    assert "告警" in zh and "3 笔退款在微信支付处于异常（ABNORMAL）状态" in zh
    assert "阶段：poll_refund" in zh and "时间：2026-12-07 20:00:05 +08:00" in zh
    en = text_of(fmt, payload(fmt, ALERT, locale="en", timezone="UTC"))
    assert "FIRING" in en and "3 refund(s) ABNORMAL at WeChat Pay" in en and "at: 2026-12-07 12:00:05 UTC" in en
    assert "abnormal_refunds" in zh and "abnormal_refunds" in en  # the rule's name is a name


def test_the_json_format_keeps_its_keys_rule_state_and_utc_time_in_both_languages():
    zh, en = (payload("json", ALERT, locale=loc, timezone="Asia/Shanghai") for loc in ("zh_CN", "en"))
    assert list(zh) == list(en) == ["rule", "state", "summary", "stage", "value", "at"]
    assert {k: zh[k] for k in zh if k != "summary"} == {k: en[k] for k in en if k != "summary"}
    assert zh["at"] == "2026-12-07T12:00:05+00:00"
    assert zh["summary"].startswith("3 笔退款") and en["summary"].startswith("3 refund(s)")
