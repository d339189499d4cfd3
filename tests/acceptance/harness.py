"""Acceptance harness: the real `cancel-scanner` CLI in subprocesses, a WeChat Pay emulator in the test process.

The emulator lives here, not in the daemon, so its counters (refunds created per
out_refund_no, fen refunded per order, requests in flight at once, faults injected)
survive every kill of a daemon; the harness reads them through the emulator's public
hooks (``snapshot()``, ``recorded()``) only. Daemons run in wechat ``mode: live`` against
it: the same configuration path, key files and APIv3 key from the environment as production.

Waiting is always on a condition with a deadline (``wait_until``, from
``testsupport.waiting``), never a fixed sleep to "let work happen". The daemons are
``testsupport.processes.DaemonProcess``; the shop's rows are written by ``testsupport.shop``;
the fixtures (``daemons``, ``external_emulators``) live in ``tests/acceptance/conftest.py``.
``check_invariants`` is the end-state proof every scenario shares.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import Engine, text

from cancel_scanner.gateway.emulator import Emulator
from cancel_scanner.gateway.keys import KeyMaterial
from cancel_scanner.scanners import REGISTRY
from tests.gateway_fixtures import session_keys_in
from testsupport import shop
from testsupport.emulator_faults import EmulatorFaults, FaultPlan
from testsupport.processes import DaemonProcess, run_cli, write_config
from testsupport.waiting import wait_until

SOAK = os.environ.get("CANCEL_SCANNER_SOAK") == "1"

STAGES = REGISTRY.names
SHUTDOWN_TIMEOUT_SECONDS = 10
INTERVAL_SECONDS = 0.3
RETRY_DELAYS_SECONDS = [0.2, 0.5, 1]
POLL_DELAYS_SECONDS = [0.3, 0.6]
READ_TIMEOUT_SECONDS = [1, 1]  # connect, read
LEASE_SECONDS = 10  # calls start only within lease - (connect + read) - 5 s of the claim
MAX_ATTEMPTS = 100_000  # hostile scenarios retry a lot; nothing here may give up


# --- waiting (wait_until is testsupport.waiting's) -------------------------------------------------


def hold(seconds: float, check: Callable[[], None], interval: float = 0.2) -> None:
    """Keep a condition the test imposes (an outage) for ``seconds``, checking ``check()`` all along."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    check()


# --- the external emulator -------------------------------------------------------------------------


@dataclass
class ExternalEmulator:
    """An emulator on 127.0.0.1 in the test process and the key files a live-mode daemon reads."""

    emulator: Emulator
    keys: KeyMaterial

    @classmethod
    def start(
        cls,
        key_dir: Path,
        *,
        faults: FaultPlan | None = None,
        latency: tuple[float, float] | None = None,
        success_delay: float = 0.2,
        apply_qps: int | None = None,
        query_qps: int | None = None,
        refund_spacing: float | None = None,
    ) -> ExternalEmulator:
        """``latency``: (low, high) seconds every refund call takes (the emulator's own hook);
        ``refund_spacing``: WeChat's minute between two new refunds of one payment, shortened (None: off)."""
        keys = session_keys_in(key_dir)
        emulator = Emulator(
            keys,
            host="127.0.0.1",
            latency=latency,
            success_delay=success_delay,
            faults=EmulatorFaults(faults),
            apply_qps=apply_qps,
            query_qps=query_qps,
            min_refund_interval=refund_spacing,
        ).start()
        return cls(emulator=emulator, keys=keys)

    def stop(self) -> None:
        self.emulator.stop()

    @property
    def base_url(self) -> str:
        return self.emulator.base_url

    def wechat_config(self, **overrides: Any) -> dict[str, Any]:
        """The `wechat:` section of a live-mode jobs.yaml pointing at this emulator (no secret in it)."""
        paths = self.keys.paths
        assert paths is not None
        section = {
            "mode": "live",
            "base_url": self.base_url,
            "mchid": self.keys.mchid,
            "appid": self.keys.appid,
            "merchant_serial_no": self.keys.merchant_serial_no,
            "merchant_private_key_file": str(paths.merchant_private_key),
            "platform_public_key_file": str(paths.platform_public_key),
            "platform_public_key_id": self.keys.platform_public_key_id,
            "apply_qps": 400,
            "query_qps": 800,
            "timeout_seconds": list(READ_TIMEOUT_SECONDS),
        }
        section.update(overrides)
        return section

    def env(self) -> dict[str, str]:
        """The only place the APIv3 key goes: the daemon's environment."""
        return {"WECHATPAY_APIV3_KEY": self.keys.apiv3_key}


# --- configuration, the CLI, stopping daemons and the emulator's log -----------------------------


REFUND_SPACING_SECONDS = 1.0


def fast_jobs(**overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage on a short interval and retry schedule, with attempts enough for hostile runs."""
    common = {
        "interval_seconds": INTERVAL_SECONDS,
        "max_attempts": MAX_ATTEMPTS,
        "retry_delays_seconds": list(RETRY_DELAYS_SECONDS),
    }
    gateway = {"batch_size": 100, "concurrency": 16, "lease_seconds": LEASE_SECONDS}
    jobs = {
        "intake": {**common, "batch_size": 200},
        "close_unpaid": {**common, **gateway, "not_found_recheck_seconds": 1},
        # WeChat's minute between two refunds of one payment (a reissue, partial cancels), kept short here
        "submit_refund": {**common, **gateway, "refund_spacing_seconds": REFUND_SPACING_SECONDS},
        "poll_refund": {**common, **gateway, "poll_delays_seconds": list(POLL_DELAYS_SECONDS)},
        "sync_result": {**common, "batch_size": 200},
        "restore_stock": {**common, "batch_size": 200},
        "decrement_sales": {**common, "batch_size": 200},
        "part_goods": {**common, "batch_size": 200},
    }
    for name, extra in overrides.items():
        jobs[name] = {**jobs[name], **extra}
    return jobs


def batches(*, intake: int, gateway: int) -> dict[str, dict[str, Any]]:
    """``fast_jobs`` with intake's batch size and the refund stages' (submit_refund, poll_refund)."""
    return fast_jobs(
        intake={"batch_size": intake}, submit_refund={"batch_size": gateway}, poll_refund={"batch_size": gateway}
    )


def daemon_config(
    database_url: str,
    emulator: ExternalEmulator,
    *,
    jobs: Mapping | None = None,
    wechat: Mapping | None = None,
    **top: Any,
) -> dict[str, Any]:
    return {
        "database_url": database_url,
        "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_SECONDS,
        "locale": "en",  # the scenarios read result_msg in English; tests/.../test_language.py reads Chinese
        "wechat": emulator.wechat_config(**(wechat or {})),
        "jobs": dict(jobs or fast_jobs()),
        # The daily reconciliation has tests of its own; elsewhere it would add a bill download at each start.
        "reconcile": {"enabled": False},
        **top,
    }


def paid_orders(db: Engine, emulator: ExternalEmulator, n: int) -> list[dict[str, Any]]:
    """Goods 1 and orders 1..n as the shop writes them, each paid at WeChat (the emulator knows the payment)."""
    shop.insert_goods(db, {1: (100, 1_000)})
    orders = [shop.order_row(i) for i in range(1, n + 1)]
    shop.insert_orders(db, orders)
    for o in orders:
        emulator.emulator.register_payment(o["no"], o["amount"], o["txn"])
    return orders


def settled_daemon(
    workdir: Path,
    db: Engine,
    database_url: str,
    emulator: ExternalEmulator,
    orders: Sequence[dict],
    daemons: Callable[..., DaemonProcess],
) -> tuple[DaemonProcess, Path]:
    """A live-mode daemon that has settled a merchant's cancel of every order, and the config file the
    CLI is run with beside it."""
    settings = daemon_config(database_url, emulator)
    config = write_config(workdir / "cli.yaml", settings)
    daemon = daemons(workdir, settings, emulator.env())
    daemon.start()
    daemon.wait_started()
    shop.insert_requests(db, [(o["id"], "MERCHANT_CANCEL", "clerk", "r") for o in orders])
    wait_settled(db, 60, [daemon])
    return daemon, config


def status_json(config: Path, env: Mapping[str, str], cwd: Path) -> dict[str, Any]:
    """What an operator sees from `cancel-scanner status --json`."""
    done = run_cli(["status", "--json"], config=config, env=env, cwd=cwd, timeout=60)
    assert done.returncode == 0, f"status exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def stop_all(*daemons: DaemonProcess, timeout: float) -> None:
    """SIGTERM every one still running (so they stop together), then each must exit 0 within ``timeout``."""
    for d in daemons:
        if d.alive:
            d.sigterm()
    for d in daemons:
        assert d.wait(timeout) == 0, d.tail()


def quiet_emulator_logs() -> None:
    """The emulator logs every request at DEBUG, and a traceback for every client killed mid-request:
    thousands of lines in the test's own output. Daemons keep their logs in files; this is only the far end."""
    logger.disable("cancel_scanner.gateway.emulator")


def loud_emulator_logs() -> None:
    logger.enable("cancel_scanner.gateway.emulator")


# --- reading the database -------------------------------------------------------------------------


def q_rows(db: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings().all()]


def q_scalar(db: Engine, sql: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def wait_for_count(db: Engine, sql: str, count: int, timeout: float, what: str, daemons: Any = ()) -> None:
    """Until the single value of ``sql`` (a COUNT) is ``count``; ``wait_until``'s error names ``what``."""
    wait_until(lambda: q_scalar(db, sql), timeout, what, until=lambda c: c == count, daemons=daemons)


# What each stage still has to do, straight from the contract's "picks rows where" column.
PENDING_SQL = {
    "intake": "SELECT COUNT(*) FROM req_order_ops WHERE scanned = 0",
    "close_unpaid": "SELECT COUNT(*) FROM goods_order2 WHERE close_scanned = 0 AND cancel_requested_at IS NOT NULL"
    " AND is_deleted = 0",
    "submit_refund": "SELECT COUNT(*) FROM refund_order WHERE submit_scanned = 0",
    "poll_refund": "SELECT COUNT(*) FROM refund_order WHERE submit_success = 1 AND progress_scanned = 0",
    "sync_result": "SELECT COUNT(*) FROM refund_order WHERE progress_scanned = 1 AND sync_scanned = 0",
    "restore_stock": "SELECT COUNT(*) FROM goods_order2 WHERE stock_scanned = 0 AND order_status = 'CANCELLED'"
    " AND is_deleted = 0 AND ((pay_status = 1 AND refund_status = 'REFUNDED') OR (pay_status = 0 AND refund_status = 'NONE'))",
    "decrement_sales": "SELECT COUNT(*) FROM goods_order2 WHERE sales_scanned = 0 AND order_status = 'CANCELLED'"
    " AND is_deleted = 0 AND pay_status = 1 AND refund_status = 'REFUNDED'",
    "part_goods": "SELECT COUNT(*) FROM refund_order WHERE part = 1 AND sync_success = 1 AND progress_success = 1"
    " AND goods_scanned = 0",
}


def pending_counts(db: Engine) -> dict[str, int]:
    """Rows some stage will still act on, by stage (only the non-zero ones): {} means settled."""
    with db.connect() as conn:
        counts = {stage: conn.execute(text(sql)).scalar() for stage, sql in PENDING_SQL.items()}
    return {k: v for k, v in counts.items() if v}


def wait_settled(
    db: Engine, timeout: float, daemons: Sequence[DaemonProcess] = (), what: str = "every row to settle"
) -> None:
    wait_until(lambda: pending_counts(db), timeout, what, until=lambda p: p == {}, daemons=daemons)


# --- the end state every scenario must reach -------------------------------------------------------


@dataclass
class Baseline:
    """Goods and orders as they were before the daemon touched anything."""

    goods: dict[int, dict[str, Any]]
    orders: dict[int, dict[str, Any]]

    @classmethod
    def take(cls, db: Engine) -> Baseline:
        return cls(
            goods={r["id"]: r for r in q_rows(db, "SELECT * FROM goods")},
            orders={r["id"]: r for r in q_rows(db, "SELECT * FROM goods_order2")},
        )


@dataclass
class Scenario:
    name: str
    baseline: Baseline
    daemons: Sequence[DaemonProcess] = ()
    expected_codes: Mapping[int, str] = field(default_factory=dict)  # req id -> result_code; others must be OK
    closed_orders: set[int] = field(default_factory=set)  # refunds WeChat closes: the order ends FAILED
    # (stage, order id) -> code for restore_stock / decrement_sales failures meant to happen
    # beyond GOODS_NOT_FOUND, which follows from the baseline.
    expected_failures: Mapping[tuple[str, int], str] = field(default_factory=dict)
    daemons_alive_at_end: bool = False


_UNCHANGED_ORDER_COLUMNS = (
    "order_status",
    "refund_status",
    "cancel_source",
    "wx_progress_scanned",
    "stock_scanned",
    "stock_success",
    "sales_scanned",
    "sales_success",
    "cancelled_at",
    "refunded_at",
    "is_deleted",
    "pay_status",
    "total_amount",
)


def check_invariants(db: Engine, emulator: ExternalEmulator | Emulator, scenario: Scenario) -> dict[str, int]:
    """Assert the six invariants; returns a few totals for the scenario's report line."""
    emu = emulator.emulator if isinstance(emulator, ExternalEmulator) else emulator
    snap = emu.snapshot()
    created, fen = snap["refunds_created"], snap["fen_refunded"]
    base = scenario.baseline
    v: dict[str, list[str]] = defaultdict(list)

    reqs = q_rows(db, "SELECT * FROM req_order_ops ORDER BY id")
    orders = {r["id"]: r for r in q_rows(db, "SELECT * FROM goods_order2")}
    goods = {r["id"]: r for r in q_rows(db, "SELECT * FROM goods")}
    refunds_by_order: dict[int, list[dict]] = defaultdict(list)
    for r in q_rows(db, "SELECT * FROM refund_order ORDER BY id"):
        refunds_by_order[r["order_id"]].append(r)
    oplog = q_rows(db, "SELECT order_id, event, COUNT(*) AS n FROM goods_order2_oplog GROUP BY order_id, event")

    # 5 (requests part): every request scanned, with the code it should have.
    accepted: dict[int, dict] = {}
    for req in reqs:
        want = scenario.expected_codes.get(req["id"], "OK")
        got = (req["scanned"], req["success"], req["result_code"])
        if got != (1, 1 if want == "OK" else 0, want):
            v["5 requests"].append(
                f"req {req['id']} (order {req['order_id']}): (scanned, success, code)={got}, want {want}"
            )
        if req["scanned"] == 1 and (not req["result_msg"] or req["scanned_at"] is None):
            v["5 requests"].append(f"req {req['id']}: no result_msg/scanned_at")
        if req["result_code"] == "OK":
            if req["order_id"] in accepted:
                v["1 money"].append(
                    f"order {req['order_id']}: two requests accepted ({accepted[req['order_id']]['id']}, {req['id']})"
                )
            accepted[req["order_id"]] = req
    missing_codes = set(scenario.expected_codes) - {r["id"] for r in reqs}
    if missing_codes:
        v["5 requests"].append(f"requests lost: {sorted(missing_codes)}")
    pend = pending_counts(db)
    if pend:
        v["5 pending"].append(f"still pending: {pend}")

    if set(orders) != set(base.orders):
        v["2 orders"].append(f"orders appeared or vanished: {sorted(set(orders) ^ set(base.orders))[:20]}")
    if set(goods) != set(base.goods):
        v["3 goods"].append(f"goods appeared or vanished: {sorted(set(goods) ^ set(base.goods))[:20]}")

    expected_events: dict[int, set[str]] = {}
    stock_back: Counter[int] = Counter()
    sales_down: Counter[int] = Counter()
    our_numbers: set[str] = set()
    expected_stage_failures = dict(scenario.expected_failures)
    for oid, before in base.orders.items():
        now_ = orders.get(oid)
        if now_ is None:
            continue
        refunds = refunds_by_order.get(oid, [])
        our_numbers.update(r["out_refund_no"] for r in refunds)
        req = accepted.get(oid)
        if req is None:
            # Not cancelled by us: not a column the scanner owns may have moved, no money, no log.
            changed = {c: (before[c], now_[c]) for c in _UNCHANGED_ORDER_COLUMNS if before[c] != now_[c]}
            if changed:
                v["2 orders"].append(f"order {oid} was not cancelled by a request but changed: {changed}")
            if refunds:
                v["1 money"].append(f"order {oid} has refunds without an accepted request")
            if fen.get(before["order_no"], 0):
                v["1 money"].append(f"order {oid}: {fen[before['order_no']]} fen refunded without an accepted request")
            expected_events[oid] = set()
            continue

        paid = before["pay_status"] == 1
        closed = oid in scenario.closed_orders
        source = {"MERCHANT_CANCEL": "MERCHANT", "USER_CANCEL": "USER"}[req["op_type"]]
        events = {"CANCELLED"}
        if (now_["order_status"], now_["cancel_source"]) != ("CANCELLED", source) or now_["cancelled_at"] is None:
            v["2 orders"].append(
                f"order {oid}: status {now_['order_status']}/{now_['cancel_source']}/{now_['cancelled_at']}"
            )
        if paid:
            # 1: exactly one refund, of exactly what was paid, created once at WeChat.
            amount = before["total_amount"]
            if len(refunds) != 1:
                v["1 money"].append(f"order {oid}: {len(refunds)} refund rows")
            for r in refunds:
                number = r["out_refund_no"]
                if (r["refund_amount"], r["total_amount"]) != (amount, amount):
                    v["1 money"].append(
                        f"order {oid}: refund of {r['refund_amount']}/{r['total_amount']} fen, paid {amount}"
                    )
                if created.get(number) != 1:
                    v["1 money"].append(f"{number}: created {created.get(number, 0)} times at WeChat")
                rec = emu.recorded(number)
                want_status = "CLOSED" if closed else "SUCCESS"
                if rec is None or rec[1] != want_status or r["wx_refund_id"] != rec[0]:
                    v["1 money"].append(
                        f"{number}: WeChat has {rec}, row says {r['wx_refund_id']}/{r['wx_status']}, want {want_status}"
                    )
                flags = (
                    r["submit_scanned"],
                    r["submit_success"],
                    r["progress_scanned"],
                    r["progress_success"],
                    r["sync_scanned"],
                    r["sync_success"],
                )
                want_flags = (1, 1, 1, 0 if closed else 1, 1, 1)
                if flags != want_flags or r["wx_status"] != want_status:
                    v["2 refunds"].append(f"{number}: flags {flags} {r['wx_status']}, want {want_flags} {want_status}")
                if r["lease_owner"] is not None or r["submitted_at"] is None:
                    v["2 refunds"].append(f"{number}: lease {r['lease_owner']}, submitted_at {r['submitted_at']}")
                if not closed and r["success_time"] is None:
                    v["2 refunds"].append(f"{number}: SUCCESS without success_time")
            got_fen = fen.get(before["order_no"], 0)
            if got_fen != (0 if closed else amount):
                v["1 money"].append(f"order {oid}: {got_fen} fen refunded at WeChat, want {0 if closed else amount}")
            events.add("REFUND_SUBMITTED")
            if closed:
                events.add("REFUND_FAILED")
                want = ("FAILED", 1)
                if (now_["refund_status"], now_["wx_progress_scanned"]) != want or now_["refunded_at"] is not None:
                    v["2 orders"].append(
                        f"order {oid}: {now_['refund_status']}/{now_['wx_progress_scanned']}/{now_['refunded_at']}, want FAILED"
                    )
            else:
                events.add("REFUND_SUCCEEDED")
                if (now_["refund_status"], now_["wx_progress_scanned"]) != ("REFUNDED", 1) or now_[
                    "refunded_at"
                ] is None:
                    v["2 orders"].append(
                        f"order {oid}: {now_['refund_status']}/{now_['wx_progress_scanned']}/{now_['refunded_at']}, want REFUNDED"
                    )
                elif refunds and now_["refunded_at"] != refunds[0]["success_time"]:
                    v["2 orders"].append(
                        f"order {oid}: refunded_at {now_['refunded_at']} is not WeChat's {refunds[0]['success_time']}"
                    )
                elif now_["refunded_at"] < now_["cancelled_at"].replace(
                    microsecond=0
                ):  # success_time has whole seconds
                    v["2 orders"].append(
                        f"order {oid}: refunded {now_['refunded_at']} before cancelled {now_['cancelled_at']}"
                    )
        else:
            if refunds or fen.get(before["order_no"], 0):
                v["1 money"].append(f"unpaid order {oid} has a refund")
            if (now_["refund_status"], now_["refunded_at"]) != ("NONE", None):
                v["2 orders"].append(f"unpaid order {oid}: {now_['refund_status']}/{now_['refunded_at']}")

        # 2/3: stock and sales, from what the order went through.
        goods_known = before["goods_id"] in base.goods
        stock_due = not paid or not closed
        sales_due = paid and not closed
        for stage, due, scanned, success, last_error, counter in (
            ("restore_stock", stock_due, "stock_scanned", "stock_success", "stock_last_error", stock_back),
            ("decrement_sales", sales_due, "sales_scanned", "sales_success", "sales_last_error", sales_down),
        ):
            got = (now_[scanned], now_[success])
            if not due:
                want_code = None
                want = (0, 0)
            else:
                want_code = "GOODS_NOT_FOUND" if not goods_known else expected_stage_failures.get((stage, oid))
                want = (1, 0) if want_code else (1, 1)
            if got != want:
                v["2 orders"].append(f"order {oid}: {stage} flags {got}, want {want}")
            elif want_code and not (now_[last_error] or "").startswith(want_code):
                v["2 orders"].append(f"order {oid}: {stage} failed with {now_[last_error]!r}, want {want_code}")
            if want == (1, 1):
                counter[before["goods_id"]] += before["quantity"]
                events.add("STOCK_RESTORED" if stage == "restore_stock" else "SALES_DECREMENTED")
        expected_events[oid] = events

    # 1: nothing at WeChat that we did not mean, nothing twice, nothing over what was paid.
    twice = {n: c for n, c in created.items() if c != 1}
    if twice:
        v["1 money"].append(f"refund numbers created more than once: {twice}")
    strangers = set(created) - our_numbers
    if strangers:
        v["1 money"].append(f"refunds at WeChat the database does not know: {sorted(strangers)[:10]}")
    paid_by_no = {o["order_no"]: o["total_amount"] for o in base.orders.values()}
    over = {no: f for no, f in fen.items() if f > paid_by_no.get(no, 0) or f < 0}
    if over:
        v["1 money"].append(f"fen refunded beyond what was paid: {over}")

    # 3: goods moved by exactly the sums, nothing negative.
    for gid, before in base.goods.items():
        after = goods.get(gid)
        if after is None:
            continue
        want = (before["stock"] + stock_back[gid], before["sales"] - sales_down[gid])
        if (after["stock"], after["sales"]) != want:
            v["3 goods"].append(f"goods {gid}: stock/sales {(after['stock'], after['sales'])}, want {want}")
        if after["stock"] < 0 or after["sales"] < 0:
            v["3 goods"].append(f"goods {gid} negative: {after}")

    # 4: each event once per order that reached it, and no other.
    got_events: dict[int, set[str]] = defaultdict(set)
    for r in oplog:
        got_events[r["order_id"]].add(r["event"])
        if r["n"] != 1:
            v["4 oplog"].append(f"order {r['order_id']}: {r['event']} written {r['n']} times")
    for oid in set(expected_events) | set(got_events):
        if got_events.get(oid, set()) != expected_events.get(oid, set()):
            v["4 oplog"].append(
                f"order {oid}: events {sorted(got_events.get(oid, set()))}, want {sorted(expected_events.get(oid, set()))}"
            )

    # 5: no 1/0 anywhere except where the scenario meant one (already checked per order and request);
    # refund_order failures are only the CLOSED ones.
    failed_refunds = q_rows(
        db,
        "SELECT id, order_id, out_refund_no, last_error, submit_scanned, submit_success, progress_scanned, progress_success,"
        " sync_scanned, sync_success FROM refund_order WHERE (submit_scanned = 1 AND submit_success = 0)"
        " OR (progress_scanned = 1 AND progress_success = 0) OR (sync_scanned = 1 AND sync_success = 0)",
    )
    for r in failed_refunds:
        if not (r["order_id"] in scenario.closed_orders and r["submit_success"] == 1 and r["sync_success"] == 1):
            v["5 failed rows"].append(f"refund {r['out_refund_no']} failed: {r['last_error']}")
    leased = q_scalar(db, "SELECT COUNT(*) FROM refund_order WHERE lease_owner IS NOT NULL")
    if leased:
        v["5 pending"].append(f"{leased} refund rows still leased")

    # 6: the daemons.
    for d in scenario.daemons:
        v["6 daemons"].extend(d.unexpected_exits())
        v["6 daemons"].extend(f"{d.name}: stray output: {line}" for line in d.stray_output()[:5])
        if scenario.daemons_alive_at_end and not d.alive:
            v["6 daemons"].append(f"{d.name} is not running at the end")

    v = {k: lines for k, lines in v.items() if lines}
    if v:
        report = "\n".join(
            f"[{k}] " + "\n    ".join(lines[:15]) + (f"\n    ... {len(lines) - 15} more" if len(lines) > 15 else "")
            for k, lines in sorted(v.items())
        )
        raise AssertionError(f"{scenario.name}: invariants violated\n{report}")
    return {
        "requests": len(reqs),
        "refunds": sum(1 for rs in refunds_by_order.values() for _ in rs),
        "apply_calls": sum(c for (m, _s), c in snap["requests"].items() if m == "POST"),
        "query_calls": sum(c for (m, _s), c in snap["requests"].items() if m == "GET"),
    }


def report(scenario: str, **facts: Any) -> None:
    """One line per scenario in the captured output (pytest -s shows it): N, kills, faults, time."""
    print(f"\n[acceptance] {scenario}: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


__all__ = [
    "SHUTDOWN_TIMEOUT_SECONDS",
    "SOAK",
    "STAGES",
    "Baseline",
    "ExternalEmulator",
    "Scenario",
    "Stopwatch",
    "check_invariants",
    "daemon_config",
    "fast_jobs",
    "hold",
    "loud_emulator_logs",
    "pending_counts",
    "q_rows",
    "q_scalar",
    "paid_orders",
    "quiet_emulator_logs",
    "report",
    "settled_daemon",
    "status_json",
    "stop_all",
    "wait_settled",
]
