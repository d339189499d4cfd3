"""The daemon's settings as the benchmarks use them: jobs.yaml's, and in-process configurations."""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from bench import REPO
from cancel_scanner.config import Config, parse_config
from cancel_scanner.scanners import REGISTRY

ALLOW_SANDBOX_ENV = {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}
INTERVAL_SECONDS = 2.0  # jobs.yaml's


def jobs(enabled: Iterable[str] | None = None, **overrides: dict) -> dict:
    """jobs.yaml's defaults (interval 2 s, batch 500 / 200, concurrency 16); only ``enabled`` stages on."""
    default = yaml.safe_load((REPO / "jobs.yaml").read_text(encoding="utf-8"))["jobs"]
    out = {}
    for name in REGISTRY.names:
        job = dict(default.get(name) or {})
        if enabled is not None:
            job["enabled"] = name in set(enabled)
        job.update(overrides.get(name, {}))
        out[name] = job
    return out


def sandbox(url: str, job_settings: dict | None = None) -> Config:
    """An in-process Config (sandbox gateway) for a Runner the benchmark drives itself."""
    raw = {"database_url": url, "wechat": {"mode": "sandbox"}, "jobs": job_settings or jobs()}
    return parse_config(raw, REGISTRY, env=ALLOW_SANDBOX_ENV)
