"""`cancel-scanner config --defaults` prints the effective configuration, and what jobs.yaml and the
documentation say of each key agrees with it: one constant per default, in the package that owns it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cancel_scanner.cli import main
from cancel_scanner.config import parse_config
from cancel_scanner.scanners import REGISTRY

ROOT = Path(__file__).resolve().parents[2]


def defaults() -> dict[str, Any]:
    return parse_config({}, REGISTRY, env={}).effective()


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def test_config_defaults_prints_every_key_with_the_value_the_daemon_runs_with():
    printed = CliRunner().invoke(main, ["config", "--defaults"])
    assert printed.exit_code == 0, printed.output
    assert yaml.safe_load(printed.output) == defaults()
    assert {"database_url", "wechat", "jobs", "monitoring", "alerts", "reconcile", "prune"} <= set(
        yaml.safe_load(printed.output)
    )
    assert set(yaml.safe_load(printed.output)["jobs"]) == set(REGISTRY.names)


def test_every_key_jobs_yaml_sets_has_its_default_value():
    """The shipped jobs.yaml restates the defaults for the operator to read and change: it must not lie."""
    shipped = leaves(yaml.safe_load((ROOT / "jobs.yaml").read_text(encoding="utf-8")))
    effective = leaves(defaults())
    assert shipped, "jobs.yaml sets nothing"
    differ = {
        key: (value, effective.get(key, "<not a key>"))
        for key, value in shipped.items()
        if effective.get(key, object()) != value
    }
    assert differ == {}


TABLE_ROW = re.compile(r"^\| `([^|]+?)` \| ([^|]*?) \| ")


def documented() -> dict[str, str]:
    """docs/operations.md's table of keys: key -> the default it states (one row may name several)."""
    found: dict[str, str] = {}
    for line in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").splitlines():
        row = TABLE_ROW.match(line)
        if not row:
            continue
        keys = [k.strip(" `") for k in row.group(1).split(",")]
        values = (
            [v.strip(" `") for v in row.group(2).split(",")] if "[" not in row.group(2) else [row.group(2).strip(" `")]
        )
        prefix = keys[0].rpartition(".")[0]
        for i, key in enumerate(keys):
            full = key if "." in key or not prefix else f"{prefix}.{key}"
            found[full] = values[i] if len(values) == len(keys) else values[0]
    return found


def test_the_documented_defaults_are_the_effective_ones():
    effective = leaves(defaults())
    gateway = {"close_unpaid", "submit_refund", "poll_refund"}
    checked = 0
    for key, text in documented().items():
        value_text = text.split(";")[0].split(" (")[0].strip(" `")
        if value_text in ("", "none", "off", "above", "sandbox values") or "*" in key:
            continue
        value = yaml.safe_load(value_text)
        if "<stage>" in key or "<gateway stage>" in key:
            stages = gateway if "<gateway stage>" in key else set(REGISTRY.names) - gateway
            targets = [key.replace("<stage>", s).replace("<gateway stage>", s) for s in sorted(stages)]
        else:
            targets = [key]
        for target in targets:
            assert target in effective, f"docs/operations.md documents {target}, which is not a key"
            assert effective[target] == value, (
                f"docs/operations.md says {target} defaults to {value!r}; it is {effective[target]!r}"
            )
            checked += 1
    assert checked >= 40  # the table is read, not skipped


@pytest.mark.parametrize("args", [["config"], ["config", "--defaults"]])
def test_config_never_prints_a_secret(tmp_path, monkeypatch, args):
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "database_url: mysql+pymysql://shop:S3cr3t-pass@127.0.0.1/shop\n"
        "alerts: {webhook_url: 'https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=robot-key-123'}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("CANCEL_SCANNER_ALLOW_SANDBOX", "1")
    monkeypatch.setenv("CANCEL_SCANNER_ALERT_SECRET", "signing-secret-456")
    monkeypatch.setenv("CANCEL_SCANNER_MONITORING_TOKEN", "monitoring-token-789-abcdef")
    printed = CliRunner().invoke(main, ["--config", str(path), *args])
    assert printed.exit_code == 0, printed.output
    for secret in ("S3cr3t-pass", "robot-key-123", "signing-secret-456", "monitoring-token-789"):
        assert secret not in printed.output
    if args == ["config"]:
        assert "mysql+pymysql://shop:***@127.0.0.1/shop" in printed.output
