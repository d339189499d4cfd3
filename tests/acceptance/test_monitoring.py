"""Metrics and health of a running daemon (issue 14, first part): `cancel-scanner run` with
`monitoring.listen`, live mode against the emulator, on MariaDB.

Given a daemon serving /metrics, when merchants' cancels flow through it, then the counters equal
what the database shows (requests accepted, refunds submitted, rows restocked), the gauges say
nothing is pending once it settled, no label carries an order id or a refund number, and
/healthz and /readyz answer 200.
"""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest

from tests.acceptance import harness
from testsupport import shop
from testsupport.waiting import wait_until

pytestmark = pytest.mark.mysql
N = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(exposition: str) -> dict[str, float]:
    """'name{labels}' -> value, for the cancel_scanner_ series."""
    out = {}
    for line in exposition.splitlines():
        if line.startswith("cancel_scanner_") and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_a_daemons_metrics_match_the_database_and_its_health_checks_answer(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    port = free_port()
    orders = harness.paid_orders(mysql_db, emu, N)
    config = harness.daemon_config(mysql_url, emu, monitoring={"listen": f"127.0.0.1:{port}", "refresh_seconds": 1})
    daemon = daemons(tmp_path, config, emu.env())
    daemon.start()
    daemon.wait_started()
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: get(base + "/healthz")[0] == 200, 10, "healthz", daemons=[daemon])
    assert get(base + "/readyz") == (200, "ready\n")

    shop.insert_requests(mysql_db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])
    harness.wait_settled(mysql_db, 60, [daemon])

    def settled_metrics():
        m = samples(get(base + "/metrics")[1])
        return (
            m
            if m.get('cancel_scanner_rows_total{outcome="done",stage="decrement_sales"}') == N
            and all(v == 0 for k, v in m.items() if k.startswith("cancel_scanner_pending_rows"))
            else None
        )

    m = wait_until(settled_metrics, 15, "the metrics to catch up with the database", daemons=[daemon])
    accepted = harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM req_order_ops WHERE result_code = 'OK'")
    submitted = harness.q_scalar(mysql_db, "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1")
    assert m['cancel_scanner_rows_total{outcome="done",stage="intake"}'] == accepted == N
    assert m['cancel_scanner_rows_total{outcome="done",stage="submit_refund"}'] == submitted == N
    assert m['cancel_scanner_wechat_requests_total{endpoint="apply",outcome="ok"}'] == N
    assert m['cancel_scanner_stage_up{stage="submit_refund"}'] == 1
    assert m["cancel_scanner_leases_held"] == 0
    assert m['cancel_scanner_batch_seconds_count{stage="intake"}'] >= 1
    exposition = get(base + "/metrics")[1]
    assert "process_cpu_seconds_total" in exposition
    # No order id, order number or refund number in any label.
    for o in orders:
        assert o["no"] not in exposition and f"CSR{o['id']}-" not in exposition
    assert not re.search(r'(order|refund|trade)[a-z_]*="', exposition)
    assert get(base + "/nothing")[0] == 404
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0
