"""Chinese by default, English on request (issue 27): with the default configuration a merchant's rejected
request reads Chinese, the status page (headless Chromium) says lang="zh-CN" with Chinese headings and
Beijing times, and `status` prints Chinese; result codes, stage names and the page's structure are the
same in both languages. (Every other acceptance test runs with locale: en.)"""

from __future__ import annotations

import re

from cancel_scanner.i18n import render
from cancel_scanner.scanners import REGISTRY
from cancel_scanner.scanners.intake import MESSAGES
from tests.acceptance import harness
from tests.acceptance.test_monitoring import free_port, get
from tests.acceptance.test_status_page import Dom, dump_dom
from testsupport import processes, shop
from testsupport.waiting import wait_until

MISSING = 900_001


def test_the_default_language_is_chinese_on_the_page_in_status_and_in_result_msg(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    port = free_port()
    orders = harness.paid_orders(mysql_db, emu, 2)
    config = harness.daemon_config(mysql_url, emu, monitoring={"listen": f"127.0.0.1:{port}", "refresh_seconds": 1})
    del config["locale"]  # the default
    daemon = daemons(tmp_path, config, emu.env())
    daemon.start()
    daemon.wait_started()
    shop.insert_requests(
        mysql_db,
        [(o["id"], "MERCHANT_CANCEL", "clerk", "缺货") for o in orders] + [(MISSING, "MERCHANT_CANCEL", "c", "x")],
    )
    harness.wait_settled(mysql_db, 60, [daemon])

    answers = {r["order_id"]: r for r in harness.q_rows(mysql_db, "SELECT * FROM req_order_ops")}
    assert answers[MISSING]["result_code"] == "ORDER_NOT_FOUND"  # the code is the code, in every language
    assert (
        answers[MISSING]["result_msg"]
        == render(MESSAGES["ORDER_NOT_FOUND"], "zh_CN")
        == "找不到该订单（order_id 不存在）"
    )
    assert all(answers[o["id"]]["result_msg"].startswith("已取消") for o in orders)

    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: str(MISSING) in get(url)[1], 20, "the rejection on the page", daemons=[daemon])
    markup = dump_dom(url, tmp_path / "profile")
    dom = Dom(markup)
    assert re.search(r'<html lang="zh-CN"', markup)
    assert dom.title == "cancel-scanner 运行状态"
    assert "<h2>各阶段</h2>" in markup and "<h2>最近被拒绝的申请</h2>" in markup
    stages = dom.table("stages")
    assert [row["阶段"] for row in stages] == list(REGISTRY.names)  # stage names stay as they are
    assert all(row["状态"] == "正常" for row in stages)
    (rejected,) = dom.table("rejected")
    assert (rejected["result_code"], rejected["result_msg"]) == ("ORDER_NOT_FOUND", "找不到该订单（order_id 不存在）")
    assert re.search(r"快照采集于 \d+ 秒前（\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+08:00）", markup)  # Beijing time

    shown = processes.run_cli(["status"], config=daemon.config_path, env=emu.env(), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    head = shown.stdout.splitlines()[0]
    assert head.split() == ["阶段", "待处理", "等待重试", "失败", "已完成*", "最久", "状态"]
    assert "intake" in shown.stdout and "正常" in shown.stdout
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0


def test_a_wecom_alert_from_a_daemon_on_defaults_is_chinese_on_beijing_time(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    from testsupport.emulator_faults import FaultPlan
    from testsupport.webhook import WebhookReceiver

    emu = external_emulators(tmp_path / "keys")
    orders = harness.paid_orders(mysql_db, emu, 4)
    emu.emulator.faults.plan = FaultPlan(p_5xx=1.0)  # every call answered 5xx: the failure-rate alert fires
    with WebhookReceiver() as robot:
        config = harness.daemon_config(
            mysql_url,
            emu,
            monitoring={"refresh_seconds": 1},
            alerts={
                "webhook_url": f"{robot.url}/cgi-bin/webhook/send?key=k",
                "format": "wecom",
                "rules": {"gateway_failure_rate": {"threshold": 0.5, "window_seconds": 10, "min_calls": 3}},
            },
        )
        del config["locale"]  # the default
        daemon = daemons(tmp_path, config, emu.env())
        daemon.start()
        daemon.wait_started()
        shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])
        (firing,) = wait_until(robot.bodies, 60, "the firing message", until=bool, daemons=[daemon])
        emu.emulator.faults.plan = None
        daemon.sigterm()
        assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
    content = firing["markdown"]["content"]
    assert content.startswith("**告警** gateway_failure_rate")  # the rule's name is a name, in every language
    assert "次微信支付调用中有" in content and "未得到可用答复" in content
    assert re.search(r"时间：\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+08:00", content), content
