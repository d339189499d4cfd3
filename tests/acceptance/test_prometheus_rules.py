"""The shipped Prometheus alert rules (deploy/prometheus/alerts.yml): promtool accepts them, their
unit tests pass (alerts_test.yml), they name only metrics the daemon defines, and their
thresholds are the daemon's own alert defaults.

promtool comes with Debian's `prometheus` package (scripts/test installs it). Without it these
tests skip locally and FAIL under ``CI=true``, as the MariaDB tests do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import cancel_scanner
from cancel_scanner.config import parse_config
from cancel_scanner.scanners import REGISTRY
from tests.conftest import IN_CI

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
ALERTS_TEST = RULES_DIR / "alerts_test.yml"
PROMTOOL_TIMEOUT_SECONDS = 60
SHIPPED_ALERTS = (
    "CancelScannerGatewayFailureRate",
    "CancelScannerRowsFailed",
    "CancelScannerOldestPending",
    "CancelScannerAbnormalRefunds",
    "CancelScannerChannelFactsOpen",
    "CancelScannerShipDue",
    "CancelScannerStageDown",
    "CancelScannerConfigError",
    "CancelScannerClockSkew",
    "CancelScannerGaugesStale",
    "CancelScannerReconcileDiffers",
    "CancelScannerReconcileLate",
    "CancelScannerDown",
    "CancelScannerAbsent",
)
# Prometheus' own series the rules may use besides the daemon's.
PROMETHEUS_METRICS = {"up"}
# What PromQL spells with words: functions, aggregations, operators, modifiers.
PROMQL_WORDS = {
    "abs",
    "absent",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "increase",
    "rate",
    "irate",
    "time",
    "offset",
    "bool",
}
# A counter's or a histogram's exposition adds these to the name the code gives it.
SAMPLE_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def require_binary(name: str) -> str:
    """The path of ``name``; without it a skip, or a failure under CI=true."""
    found = shutil.which(name)
    if found:
        return found
    reason = f"{name} not found (install Debian's prometheus package; scripts/test does)"
    if IN_CI:
        pytest.fail(f"{name} is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_binary("promtool"), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
    )


def shipped_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    assert [g["name"] for g in groups] == ["cancel-scanner"]
    return groups[0]["rules"]


def expr_of(alert: str) -> str:
    return next(r["expr"] for r in shipped_rules() if r["alert"] == alert)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    grouping labels, durations and PromQL's own words are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return words - PROMQL_WORDS


def daemon_metric_names() -> set[str]:
    """Every cancel_scanner_* name written in the package's source."""
    package = Path(cancel_scanner.__file__).parent
    return {
        name
        for source in package.rglob("*.py")
        for name in re.findall(r"[\"'](cancel_scanner_[a-z0-9_]+)[\"']", source.read_text(encoding="utf-8"))
    }


def test_promtool_accepts_the_rules_and_finds_every_shipped_alert():
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(SHIPPED_ALERTS)} rules found" in done.stdout, done.stdout
    assert tuple(r["alert"] for r in shipped_rules()) == SHIPPED_ALERTS


def test_the_rules_unit_tests_pass():
    done = promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for rule in shipped_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_metric_names_reads_the_selected_names_only():
    expr = (
        'sum without (endpoint, outcome) (increase(a_total{outcome=~"x|y"}[5m])) / b >= 0.5 and abs(up{job="c"}) == 0'
    )
    assert metric_names(expr) == {"a_total", "b", "up"}


def test_the_rules_use_only_metrics_the_daemon_defines():
    defined = daemon_metric_names()
    used = {name for rule in shipped_rules() for name in metric_names(rule["expr"])}
    assert {"cancel_scanner_wechat_requests_total", "cancel_scanner_stage_up", "up"} <= used, used
    unknown = sorted(
        name
        for name in used - PROMETHEUS_METRICS
        if name not in defined and not any(name.endswith(s) and name[: -len(s)] in defined for s in SAMPLE_SUFFIXES)
    )
    assert unknown == [], f"alerts.yml uses metrics the cancel_scanner package does not define: {unknown}"


def test_the_thresholds_are_the_daemons_alert_defaults():
    rules = parse_config({}, REGISTRY, env={}).alerts.rules  # the daemon's: jobs.yaml's laid over the stages' own
    rate = rules.gateway_failure_rate
    window = f"[{int(rate.window_seconds) // 60}m]"
    failing = expr_of("CancelScannerGatewayFailureRate")
    assert f">= {rate.threshold}" in failing and f">= {rate.min_calls}" in failing and window in failing
    assert f">= {rules.rows_failed.threshold}" in expr_of("CancelScannerRowsFailed")
    assert f">= {rules.abnormal_refunds.threshold}" in expr_of("CancelScannerAbnormalRefunds")
    assert f">= {rules.channel_facts.threshold}" in expr_of("CancelScannerChannelFactsOpen")
    assert f">= {rules.ship_due.threshold}" in expr_of("CancelScannerShipDue")

    oldest = rules.oldest_pending
    pending = expr_of("CancelScannerOldestPending")
    others = re.search(r'\{stage!~"([^"]*)"\} > (\d+)', pending)
    assert others is not None, pending
    assert set(others.group(1).split("|")) == set(oldest.stage_threshold_seconds)
    assert int(others.group(2)) == int(oldest.threshold_seconds)
    for stage, seconds in oldest.stage_threshold_seconds.items():
        assert f'{{stage="{stage}"}} > {int(seconds)}' in pending

    down = next(r for r in shipped_rules() if r["alert"] == "CancelScannerStageDown")
    assert down["for"] == f"{int(rules.stage_down.for_seconds) // 60}m"
    config = rules.config_error
    assert f"[{int(config.window_seconds) // 60}m]" in expr_of("CancelScannerConfigError")
    assert f"> {int(config.clock_skew_seconds)}" in expr_of("CancelScannerClockSkew")
    hours, minutes = (int(part) for part in rules.reconcile.deadline.split(":"))
    assert f"> {(24 + hours) * 3600 + minutes * 60}" in expr_of("CancelScannerReconcileLate")


def test_the_scrape_example_sends_the_token_from_a_file_and_promtool_accepts_it(tmp_path):
    """Issue 24, item 3: how to scrape /metrics behind its token (Bearer, from a file, never inline)."""
    example = (RULES_DIR / "prometheus.yml").read_text(encoding="utf-8")
    assert (
        "credentials_file:" in example
        and "type: Bearer" in example
        and "credentials:" not in example.replace("credentials_file:", "")
    )
    token = tmp_path / "cancel-scanner.token"
    token.write_text("x" * 32, encoding="utf-8")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        example.replace("/etc/prometheus/cancel-scanner.token", str(token)).replace("  - alerts.yml", f"  - {ALERTS}"),
        encoding="utf-8",
    )
    done = promtool("check", "config", str(config))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
