"""A real Prometheus scrapes a running daemon and loads the shipped alert rules.

Given a live-mode daemon on MariaDB serving /metrics, and a Prometheus server (Debian's
`prometheus`, started here on a loopback port) scraping it every second with
deploy/prometheus/alerts.yml as its rules, when merchants' cancels flow through the daemon, then
Prometheus' HTTP API returns the rows intake accepted as the database counts them, every stage
up, every shipped alert loaded and evaluated, and none firing.

Without the prometheus binary this skips locally and FAILS under ``CI=true``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.acceptance import harness
from tests.acceptance.test_monitoring import free_port, get
from tests.acceptance.test_prometheus_rules import ALERTS, require_binary, shipped_rules
from testsupport import shop
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql
N = 12
JOB = "cancel-scanner"  # matches the rules' `.*cancel.scanner.*`
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10


class PrometheusServer:
    """`prometheus` on 127.0.0.1:``port``, its data and log in ``workdir``; wait_until can watch it as a daemon."""

    name = "prometheus"

    def __init__(self, workdir: Path, scrape: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [scrape]}]}],
                },
                sort_keys=False,
            ),
            encoding="utf-8",
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        cmd = [
            require_binary("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(lambda: self._answers("/-/ready"), START_TIMEOUT_SECONDS, "prometheus to be ready", daemons=[self])
        return self

    def stop(self) -> None:
        """SIGTERM; SIGKILL if it has not exited within STOP_TIMEOUT_SECONDS."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_SECONDS)

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful answer of /api/v1/``path``."""
        status, body = get(f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else ""))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", body
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self.api("query", query=promql)["result"]

    def _answers(self, path: str) -> bool:
        try:
            return get(self.base + path)[0] == 200
        except OSError:
            return False

    # what wait_until needs of a daemon to stop waiting when it died

    @property
    def started(self) -> bool:
        return self.proc is not None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    exit_expected = False

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 30) -> str:
        got = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(got)} lines) ---\n" + "\n".join(got)


@pytest.fixture
def prometheus(tmp_path):
    """Factory: a PrometheusServer scraping HOST:PORT, started; stopped at teardown."""
    require_binary("prometheus")
    started: list[PrometheusServer] = []

    def start(scrape: str) -> PrometheusServer:
        workdir = tmp_path / f"prometheus{len(started) + 1}"
        workdir.mkdir()
        server = PrometheusServer(workdir, scrape)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def value_of(vector: list[dict[str, Any]]) -> float | None:
    """The one sample's value; None while the series is not there."""
    return float(vector[0]["value"][1]) if len(vector) == 1 else None


def test_prometheus_scrapes_a_daemon_and_loads_the_shipped_alerts(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons, prometheus
):
    emu = external_emulators(tmp_path / "keys")
    port = free_port()
    orders = harness.paid_orders(mysql_db, emu, N)
    config = harness.daemon_config(mysql_url, emu, monitoring={"listen": f"127.0.0.1:{port}", "refresh_seconds": 1})
    daemon = daemons(tmp_path / "daemon", config, emu.env())
    daemon.start()
    daemon.wait_started()
    prom = prometheus(f"127.0.0.1:{port}")
    assert (
        wait_until(
            lambda: value_of(prom.query(f'up{{job="{JOB}"}}')),
            30,
            "prometheus to scrape the daemon",
            daemons=[daemon, prom],
        )
        == 1
    )

    shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])
    harness.wait_settled(mysql_db, 60, [daemon])

    accepted = harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM req_order_ops WHERE result_code = 'OK'")
    intake_done = 'cancel_scanner_rows_total{stage="intake",outcome="done"}'
    assert (
        wait_until(
            lambda: value_of(prom.query(intake_done)),
            30,
            "prometheus to see intake's rows",
            until=lambda v: v == accepted,
            daemons=[daemon, prom],
        )
        == accepted
        == N
    )
    up = {s["metric"]["stage"]: float(s["value"][1]) for s in prom.query("cancel_scanner_stage_up")}
    assert up == {stage: 1.0 for stage in harness.STAGES}

    shipped = [r["alert"] for r in shipped_rules()]

    def evaluated_rules():
        groups = prom.api("rules", type="alert")["groups"]
        rules = [rule for g in groups if g["name"] == "cancel-scanner" for rule in g["rules"]]
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

    rules = wait_until(evaluated_rules, 30, "prometheus to evaluate the shipped rules", daemons=[daemon, prom])
    assert [rule["name"] for rule in rules] == shipped
    firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []

    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
