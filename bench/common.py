"""What every benchmark shares: the throwaway MariaDB, fast seeding, the daemon and emulator
as subprocesses, timing helpers and the RESULTS.md appender.

The server is ``testsupport.mariadb.MariaDBServer`` with its defaults, i.e. exactly as the
tests start it (``innodb_flush_log_at_trx_commit=2``, 256 MB buffer pool). Each
measurement gets its own database on it, so one measurement's rows and undo do not
slow the next (we also wait for InnoDB's purge to catch up between measurements).

The daemon under test is the real one: ``python -m cli --config X run`` in a
subprocess, in live mode pointed at the emulator in another subprocess
(bench/emulator_server.py), so its CPU time and peak RSS are its own.

Seeding writes rows with ``INSERT ... SELECT ... FROM seq_1_to_N`` (MariaDB's
SEQUENCE engine): 100,000 rows take about a second, 1,000,000 about ten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pymysql  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from cancel_scanner.engine.config import Config, parse_config  # noqa: E402
from cancel_scanner.scanners import REGISTRY  # noqa: E402
from cancel_scanner.engine.db import init_schema, make_engine  # noqa: E402
from testsupport.mariadb import MariaDBServer  # noqa: E402
from testsupport.waiting import timed_wait  # noqa: E402

OUT_DIR = REPO / "bench" / "out"  # logs, configs, profiles, quick-run results (git-ignored)
RESULTS_PATH = REPO / "bench" / "RESULTS.md"
QUICK_RESULTS_PATH = OUT_DIR / "RESULTS-quick.md"
ALLOW_SANDBOX_ENV = {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}

# WeChat Pay's per-merchant limits and the per-call latency the issue asks for.
WECHAT_APPLY_QPS = 150
WECHAT_QUERY_QPS = 300
GATEWAY_LATENCY_SECONDS = 0.020
INTERVAL_SECONDS = 2.0

SEED_CHUNK_ROWS = 100_000
N_GOODS = 1_000
PURGE_TIMEOUT_SECONDS = 180.0
PURGE_IDLE_HISTORY = 200  # undo log records left that we call "purged"

# Amounts vary per order, as in a real shop (1.00 .. 999.99 yuan, in fen).
AMOUNT_SQL = "(100 + (seq * 7919) % 99900)"
ORDER_NO_SQL = "CONCAT('SO', LPAD(seq, 12, '0'))"
TRANSACTION_ID_SQL = "CONCAT('4200', LPAD(seq, 24, '0'))"


# --- arguments and output ------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small N: a smoke run (results go to bench/out/RESULTS-quick.md)")
    p.add_argument("--results", type=Path, default=None, help="append the figures here (default: bench/RESULTS.md)")
    p.add_argument("--no-results", action="store_true", help="print only, append nothing")
    return p


def results_path(args: argparse.Namespace) -> Path | None:
    if args.no_results:
        return None
    if args.results:
        return args.results
    return QUICK_RESULTS_PATH if args.quick else RESULTS_PATH


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def quiet_logging() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@dataclass
class Target:
    name: str
    measured: str
    target: str
    met: bool | None  # None: not applicable in this run (said why in `measured`)


@dataclass
class Report:
    title: str
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine_before: dict = field(default_factory=dict)

    def table(self, caption: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((caption, headers, rows))
        print(f"\n{caption}\n{markdown_table(headers, rows)}", flush=True)

    def target(self, name: str, measured: str, target: str, met: bool | None) -> None:
        self.targets.append(Target(name, measured, target, met))
        mark = {True: "met", False: "NOT MET", None: "n/a"}[met]
        print(f"target {name}: {measured} (target {target}) -> {mark}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def markdown(self, command: str) -> str:
        m = self.machine_before or machine()
        after = machine_load()
        lines = [
            f"## {self.title}",
            "",
            f"- date: {m['date']}",
            f"- command: `{command}`",
            f"- machine: `{m['uname']}`; {m['cpu']}; nproc {m['nproc']}; memory {m['memory']}",
            f"- software: Python {m['python']}, {m['mariadb']}; commit {m['commit']}",
            f"- load: before {m['load']}, after {after['load']}; other test runs (pgrep -f pytest) before: "
            f"{m['pytest'] or 'none'}, after: {after['pytest'] or 'none'}",
            "",
        ]
        for caption, headers, rows in self.tables:
            lines += [f"**{caption}**", "", markdown_table(headers, rows), ""]
        if self.targets:
            rows = [[t.name, t.measured, t.target, {True: "met", False: "**NOT MET**", None: "n/a"}[t.met]] for t in self.targets]
            lines += ["**Targets**", "", markdown_table(["target", "measured", "wanted", "verdict"], rows), ""]
        for note in self.notes:
            lines.append(f"- {note}")
        if self.notes:
            lines.append("")
        return "\n".join(lines) + "\n"

    def save(self, args: argparse.Namespace) -> None:
        path = results_path(args)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the scripts in bench/ (`bench/run`); newest last.\n\n")
            f.write(self.markdown(command_line()))
        print(f"\nappended to {path}", flush=True)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(out)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- the machine -------------------------------------------------------------------------------


def _pytest_runs() -> str:
    try:
        out = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "?"
    mine = {str(os.getpid())}
    return ",".join(p for p in out if p not in mine)


def machine_load() -> dict:
    return {"load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "pytest": _pytest_runs()}


def machine(server: MariaDBServer | None = None) -> dict:
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uname = " ".join(platform.uname())
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mariadb = "MariaDB ?"
    if server is not None:
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                mariadb = f"MariaDB {cur.fetchone()[0]}"
        finally:
            conn.close()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "uname": uname,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "mariadb": mariadb,
        "commit": commit,
        **machine_load(),
    }


# --- the database ------------------------------------------------------------------------------


class Bench:
    """One throwaway MariaDB for a whole script; a fresh database per measurement."""

    def __init__(self, durable: bool = False) -> None:
        # durable: fsync the redo log at every commit (production); default: as the tests run it
        self.server = MariaDBServer(fast=not durable)
        self._engines: list[Engine] = []

    def __enter__(self) -> "Bench":
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for engine in self._engines:
            engine.dispose()
        self.server.stop()
        self.server.cleanup()

    def database(self, name: str) -> tuple[str, Engine]:
        """A new, empty database with the schema of sql/schema.sql; its URL and an engine."""
        self.server.drop_database(name)
        url = self.server.create_database(name)
        engine = make_engine(url)
        init_schema(engine)
        self._engines.append(engine)
        return url, engine

    def drop(self, name: str) -> None:
        self.server.drop_database(name)

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        """A raw autocommit connection (seeding, ceilings, counters); UTC like the daemon's."""
        conn = self.server.connect(database, read_timeout=600, write_timeout=600)
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
        return conn


def sql(conn: pymysql.connections.Connection, statement: str, params: Any = None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


def scalar(conn: pymysql.connections.Connection, statement: str, params: Any = None) -> Any:
    rows = sql(conn, statement, params)
    return rows[0][0] if rows else None


def status_counter(conn: pymysql.connections.Connection, name: str) -> int:
    return int(sql(conn, "SHOW GLOBAL STATUS LIKE %s", (name,))[0][1])


def wait_for_purge(conn: pymysql.connections.Connection, timeout: float = PURGE_TIMEOUT_SECONDS) -> float:
    """Wait until InnoDB purged the undo of earlier writes, so it does not run during the next measurement."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if status_counter(conn, "Innodb_history_list_length") <= PURGE_IDLE_HISTORY:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def _chunks(lo: int, hi: int, size: int = SEED_CHUNK_ROWS) -> Iterable[tuple[int, int]]:
    a = lo
    while a <= hi:
        b = min(hi, a + size - 1)
        yield a, b
        a = b + 1


def seed_goods(conn, n: int = N_GOODS, stock: int = 1_000_000_000, sales: int = 1_000_000_000) -> None:
    for a, b in _chunks(1, n):
        sql(conn, f"INSERT INTO goods (id, name, stock, sales) SELECT seq, CONCAT('goods ', seq), {stock}, {sales} FROM seq_{a}_to_{b}")


# goods_order2 by the state a stage leaves it in. Values: SQL expressions over `seq` (the id).
_ORDER_STATES: dict[str, dict[str, str]] = {
    # paid, never touched by the scanner: what intake expects
    "paid": {"order_status": "'PAID'"},
    # intake cancelled it and created a refund: what sync_result expects (with its refund polled)
    "refunding": {
        "order_status": "'CANCELLED'", "cancel_source": "'MERCHANT'", "refund_status": "'REFUNDING'",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
    # sync_result wrote SUCCESS: what restore_stock and decrement_sales expect
    "refunded": {
        "order_status": "'CANCELLED'", "cancel_source": "'MERCHANT'", "refund_status": "'REFUNDED'",
        "wx_progress_scanned": "1", "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE", "refunded_at": "NOW(3) - INTERVAL 5 MINUTE",
    },
    # cancelled before it was paid: restore_stock gives the goods back, no refund, no sales
    "cancelled_unpaid": {
        "pay_status": "0", "transaction_id": "NULL", "paid_at": "NULL", "order_status": "'CANCELLED'",
        "cancel_source": "'MERCHANT'", "refund_status": "'NONE'", "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
    # every stage done
    "finished": {
        "order_status": "'CANCELLED'", "cancel_source": "'MERCHANT'", "refund_status": "'REFUNDED'",
        "wx_progress_scanned": "1", "stock_scanned": "1", "stock_success": "1", "sales_scanned": "1", "sales_success": "1",
        "cancelled_at": "NOW(3) - INTERVAL 10 MINUTE", "refunded_at": "NOW(3) - INTERVAL 5 MINUTE",
    },
}


def seed_orders(conn, lo: int, hi: int, state: str, n_goods: int = N_GOODS, goods_sql: str | None = None) -> None:
    """Orders ``lo..hi`` (id = seq) in ``state`` (paid unless the state says not); one goods line each,
    quantity 1..3, goods ``1 + seq % n_goods`` unless ``goods_sql`` (an SQL expression over seq) says."""
    columns = {
        "id": "seq",
        "order_no": ORDER_NO_SQL,
        "user_id": "1000 + seq % 5000",
        "merchant_id": "9",
        "goods_id": goods_sql or f"1 + seq % {n_goods}",
        "quantity": "1 + seq % 3",
        "total_amount": AMOUNT_SQL,
        "pay_status": "1",
        "transaction_id": TRANSACTION_ID_SQL,
        "paid_at": "NOW(3) - INTERVAL 1 DAY",
        **_ORDER_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO goods_order2 ({names}) SELECT {values} FROM seq_{a}_to_{b}")


_REQUEST_STATES = {
    "pending": {},
    "finished": {
        "scanned": "1", "success": "1", "result_code": "'OK'",
        "result_msg": f"CONCAT('cancelled; full refund of ', {AMOUNT_SQL}, ' fen started')",
        "scanned_at": "NOW(3) - INTERVAL 10 MINUTE",
    },
}


def seed_requests(conn, lo: int, hi: int, state: str, id_offset: int = 0) -> None:
    """A merchant's cancel request for each order ``lo..hi`` (request id = order id + id_offset)."""
    columns = {
        "id": f"seq + {id_offset}",
        "order_id": "seq",
        "op_type": "IF(seq % 4 = 0, 'USER_CANCEL', 'MERCHANT_CANCEL')",
        "operator": "CONCAT('clerk-', seq % 50)",
        "reason": "'out of stock'",
        **_REQUEST_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO req_order_ops ({names}) SELECT {values} FROM seq_{a}_to_{b}")


_ACCEPTED = {
    "submit_scanned": "1", "submit_success": "1", "wx_refund_id": "CONCAT('50', LPAD(seq, 30, '0'))",
    "submitted_at": "NOW(3) - INTERVAL 9 MINUTE",
}
_REFUND_STATES = {
    # intake wrote it: what submit_refund expects
    "submit": {"next_attempt_at": "NOW(3) - INTERVAL 1 SECOND"},
    # WeChat accepted it, first poll due: what poll_refund expects
    "poll": {**_ACCEPTED, "wx_status": "'PROCESSING'", "next_attempt_at": "NOW(3) - INTERVAL 1 SECOND"},
    # WeChat said SUCCESS: what sync_result expects
    "sync": {
        **_ACCEPTED, "wx_status": "'SUCCESS'", "progress_scanned": "1", "progress_success": "1",
        "success_time": "NOW(3) - INTERVAL 6 MINUTE",
    },
    "finished": {
        **_ACCEPTED, "wx_status": "'SUCCESS'", "progress_scanned": "1", "progress_success": "1",
        "sync_scanned": "1", "sync_success": "1", "success_time": "NOW(3) - INTERVAL 6 MINUTE",
    },
}


def seed_refunds(conn, lo: int, hi: int, state: str) -> None:
    """The refund of each order ``lo..hi`` (refund id = order id = request id), as intake writes it."""
    columns = {
        "id": "seq",
        "order_id": "seq",
        "req_id": "seq",
        "refund_seq": "1",
        "out_refund_no": "CONCAT('CSR', seq, '-1')",
        "out_trade_no": ORDER_NO_SQL,
        "transaction_id": TRANSACTION_ID_SQL,
        "refund_amount": AMOUNT_SQL,
        "total_amount": AMOUNT_SQL,
        "reason": "'out of stock'",
        **_REFUND_STATES[state],
    }
    names, values = ", ".join(columns), ", ".join(columns.values())
    for a, b in _chunks(lo, hi):
        sql(conn, f"INSERT INTO refund_order ({names}) SELECT {values} FROM seq_{a}_to_{b}")


def seed_oplog(conn, lo: int, hi: int, events: Sequence[str]) -> None:
    for event in events:
        for a, b in _chunks(lo, hi):
            sql(
                conn,
                "INSERT INTO goods_order2_oplog (order_id, event, detail) "
                f"SELECT seq, '{event}', CONCAT('seeded ', seq) FROM seq_{a}_to_{b}",
            )


def analyze(conn) -> None:
    """Fresh index statistics, so plans do not depend on when the background recalculation ran."""
    for table in ("goods", "goods_order2", "req_order_ops", "refund_order", "goods_order2_oplog"):
        sql(conn, f"ANALYZE TABLE {table}")


# --- configuration -----------------------------------------------------------------------------


def jobs(enabled: Iterable[str] | None = None, **overrides: dict) -> dict:
    """jobs.yaml's defaults (interval 2 s, batch 500 / 200, concurrency 16); only ``enabled`` stages on."""
    from cancel_scanner.engine.config import STAGES

    default = yaml.safe_load((REPO / "jobs.yaml").read_text(encoding="utf-8"))["jobs"]
    out = {}
    for name in STAGES:
        job = dict(default.get(name) or {})
        if enabled is not None:
            job["enabled"] = name in set(enabled)
        job.update(overrides.get(name, {}))
        out[name] = job
    return out


def sandbox_config(url: str, job_settings: dict | None = None) -> Config:
    """An in-process Config (sandbox gateway) for a Runner the bench drives itself."""
    raw = {"database_url": url, "wechat": {"mode": "sandbox"}, "jobs": job_settings or jobs()}
    return parse_config(raw, REGISTRY, env=ALLOW_SANDBOX_ENV)


# --- the emulator and the daemon as subprocesses -----------------------------------------------


class EmulatorProcess:
    """bench/emulator_server.py: WeChat's limits, a per-call latency, its own CPU."""

    def __init__(
        self,
        latency: float = GATEWAY_LATENCY_SECONDS,
        apply_qps: int | None = WECHAT_APPLY_QPS,
        query_qps: int | None = WECHAT_QUERY_QPS,
        success_delay: float = 0.0,
        log_name: str = "emulator",
    ) -> None:
        self.args = [
            "--latency", str(latency), "--apply-qps", str(apply_qps or 0), "--query-qps", str(query_qps or 0),
            "--success-delay", str(success_delay),
        ]
        self.latency, self.apply_qps, self.query_qps = latency, apply_qps, query_qps
        self.log_path = OUT_DIR / f"{log_name}.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def __enter__(self) -> "EmulatorProcess":
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "emulator_server.py"), *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        log.close()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator did not start; see {self.log_path}")
        self.info = json.loads(line)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        shutil.rmtree(self.info.get("key_dir", ""), ignore_errors=True)
        self.proc = None

    def _command(self, command: str) -> dict:
        assert self.proc is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict:
        return self._command("stats")

    def reset(self) -> None:
        self._command("reset")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def wechat(self, apply_qps: float = WECHAT_APPLY_QPS, query_qps: float = WECHAT_QUERY_QPS) -> dict:
        """The `wechat:` section of a live-mode jobs.yaml pointing at this emulator."""
        i = self.info
        return {
            "mode": "live",
            "base_url": i["base_url"],
            "mchid": i["mchid"],
            "appid": i["appid"],
            "merchant_serial_no": i["merchant_serial_no"],
            "merchant_private_key_file": i["merchant_private_key_file"],
            "platform_public_key_file": i["platform_public_key_file"],
            "platform_public_key_id": i["platform_public_key_id"],
            "apply_qps": apply_qps,
            "query_qps": query_qps,
            "timeout_seconds": [5, 15],
        }

    def env(self) -> dict[str, str]:
        return {"WECHATPAY_APIV3_KEY": Path(self.info["apiv3_key_file"]).read_text(encoding="utf-8").strip()}


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident set since start), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class DaemonProcess:
    """`cancel-scanner run` in a subprocess with a generated jobs.yaml; stops on SIGTERM like in production."""

    def __init__(self, name: str, raw_config: dict, env: dict[str, str], log_level: str = "INFO") -> None:
        self.name = name
        self.raw = raw_config
        self.env = env
        self.log_level = log_level
        self.config_path = OUT_DIR / f"{name}.yaml"
        self.log_path = OUT_DIR / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.peak_rss_mb: float | None = None
        self.cpu_seconds: float | None = None

    def __enter__(self) -> "DaemonProcess":
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        # Validate here first: a typo should fail with the key's name, not a silent daemon exit.
        parse_config(self.raw, REGISTRY, env={**os.environ, **self.env})
        self.config_path.write_text(yaml.safe_dump(self.raw, sort_keys=False), encoding="utf-8")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cancel_scanner.cli", "--config", str(self.config_path), "--log-level", self.log_level, "run"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
        )
        log.close()
        wait_until(
            lambda: "cancel-scanner running" in self.log_path.read_text(errors="replace") or self.proc.poll() is not None,
            timeout=60,
            what="the daemon to start",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_mb(self) -> dict[str, float]:
        return process_memory_mb(self.pid)

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return self.exit_code
        if proc.poll() is None:
            try:
                self.peak_rss_mb = self.memory_mb()["VmHWM"]
                self.cpu_seconds = self.cpu()
            except (OSError, KeyError):
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.exit_code = proc.returncode
        self.proc = None
        return self.exit_code

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- timing ------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "a condition") -> float:
    """Poll ``predicate`` until true; returns the seconds waited. Raises TimeoutError (testsupport.waiting's loop)."""
    return timed_wait(predicate, timeout, what, interval=interval, error=TimeoutError)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def profiled_drain(runner, stage: str, counted: str = "claimed") -> tuple[float, Path | None]:
    """Run ``stage`` batch after batch until nothing is claimed, under pyinstrument if installed.

    Returns (rows per second, where the text profile was written or None). ``counted`` is the
    BatchReport figure to count (``claimed`` for database stages, ``done`` for gateway stages).
    """
    from loguru import logger

    sink = logger.add(OUT_DIR / f"profile-{stage}.log", level="INFO")  # the daemon logs at INFO too
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    profiler = Profiler(interval=0.001) if Profiler else None
    rows = 0
    started = time.perf_counter()
    if profiler:
        profiler.start()
    try:
        while True:
            report = runner.run_stage(stage)
            rows += getattr(report, counted)
            if not report.claimed:
                break
    finally:
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.stop()
        logger.remove(sink)
    out = None
    if profiler:
        out = OUT_DIR / f"profile-{stage}.txt"
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False), encoding="utf-8")
        (OUT_DIR / f"profile-{stage}.html").write_text(profiler.output_html(), encoding="utf-8")
    return rows / elapsed, out
