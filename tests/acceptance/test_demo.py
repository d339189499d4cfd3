"""`cancel-scanner demo`, run as a person would: no arguments, no server, no credentials.

Given an empty directory (with a broken jobs.yaml and a stray CANCEL_SCANNER_DB_URL,
neither of which the demo may read), when the demo runs, then it exits 0 within 30 s,
its summary names every rejected case with its code, shows refunds SUCCESS and CLOSED
with amounts and says no refund was sent twice, and the database it leaves behind has
nothing pending and stock and sales moved by exactly the accepted cancels.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from cancel_scanner.demo import DEFAULT_ORDERS, plan_demo
from cancel_scanner.engine.db import make_engine
from tests.flow import pending

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 60
MUST_FINISH_SECONDS = 30
REJECTED_CODES = (
    "ORDER_NOT_FOUND",
    "ALREADY_CANCELLED",
    "ORDER_SHIPPED",
    "ORDER_DELETED",
    "UNSUPPORTED_OP",
    "BAD_AMOUNT",
    "DUPLICATE_REQUEST",
)


def run_demo(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "TMPDIR": str(cwd), **(env or {})}
    started = time.monotonic()
    # the checks below read the English screen; test_the_demo_speaks_chinese_by_default reads the default
    language = () if "--locale" in args else ("--locale", "en")
    result = run_command([sys.executable, "-m", "cancel_scanner.cli", "demo", *language, *args], cwd, full_env)
    return result, time.monotonic() - started


def run_command(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` run to its end (at most TIMEOUT_SECONDS), its output captured as UTF-8 text."""
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT_SECONDS
    )


def refund_line(summary: str, status: str) -> tuple[int, int]:
    """(count, fen) from a line such as '  SUCCESS      24    ¥6,616.00   paid back'."""
    m = re.search(rf"^  {status}\s+(\d+)\s+¥([\d,]+)\.(\d\d)", summary, re.MULTILINE)
    assert m, f"no {status} line in the summary:\n{summary}"
    return int(m.group(1)), int(m.group(2).replace(",", "")) * 100 + int(m.group(3))


def db_rows(db, sql: str) -> list:
    with db.connect() as conn:
        return list(conn.execute(text(sql)).all())


def test_demo_with_no_arguments_settles_and_proves_its_numbers(tmp_path):
    (tmp_path / "jobs.yaml").write_text("not_a_key: 1\n", encoding="utf-8")  # read it and you exit 2
    stray = tmp_path / "someone-elses.db"

    result, elapsed = run_demo(tmp_path, env={"CANCEL_SCANNER_DB_URL": f"sqlite:///{stray}"})
    out = result.stdout

    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{out}\nstderr:\n{result.stderr}"
    assert elapsed < MUST_FINISH_SECONDS, f"took {elapsed:.1f}s"
    assert not stray.exists(), "the demo must not follow CANCEL_SCANNER_DB_URL"
    # Not a terminal: compact progress lines, at most one a second, no cursor tricks.
    assert "\x1b" not in out
    progress = [line for line in out.splitlines() if re.match(r"^\s*\d+\.\ds  req \d+/\d+", line)]
    assert 1 <= len(progress) <= elapsed + 2, progress

    # The summary a person reads.
    for code in REJECTED_CODES:
        assert re.search(rf"^    {code}\s+\d+\s+\S", out, re.MULTILINE), f"{code} missing from the summary:\n{out}"
    success_count, success_fen = refund_line(out, "SUCCESS")
    closed_count, closed_fen = refund_line(out, "CLOSED")
    assert success_count > 0 and success_fen > 0
    assert closed_count >= 1 and closed_fen > 0
    assert "no refund sent twice" in out
    assert "every check passed" in out

    seed = int(re.search(r"\(seed (\d+)\)", out).group(1))
    seeded_goods = {g.id: (g.stock, g.sales) for g in plan_demo(DEFAULT_ORDERS, seed).goods}  # before any cancel
    db_file = Path(re.search(r"^Database\s+(\S+)$", out, re.MULTILINE).group(1))
    assert db_file.is_file() and db_file.parent.parent == tmp_path  # a fresh temp dir, kept for inspection
    assert (db_file.parent / "demo.log").is_file()
    assert f"CANCEL_SCANNER_DB_URL=sqlite:///{db_file}" in out

    db = make_engine(f"sqlite:///{db_file}")
    try:
        assert pending(db) == {}

        # Refunds in the database are what the summary says.
        refunds = {
            status: (n, fen)
            for status, n, fen in db_rows(
                db, "SELECT wx_status, COUNT(*), SUM(refund_amount) FROM refund_order GROUP BY wx_status"
            )
        }
        assert refunds == {"SUCCESS": (success_count, success_fen), "CLOSED": (closed_count, closed_fen)}

        # Every rejected request carries its code; every seeded kind of rejection happened.
        codes = {code for (code,) in db_rows(db, "SELECT result_code FROM req_order_ops WHERE success = 0")}
        assert codes == set(REJECTED_CODES)
        assert db_rows(db, "SELECT COUNT(*) FROM req_order_ops WHERE scanned = 0") == [(0,)]

        # A CLOSED refund: the order FAILED and its stock and sales were left alone.
        closed_orders = db_rows(
            db,
            "SELECT o.refund_status, o.stock_scanned, o.sales_scanned FROM refund_order r"
            " JOIN goods_order2 o ON o.id = r.order_id WHERE r.wx_status = 'CLOSED'",
        )
        assert closed_orders and all(row == ("FAILED", 0, 0) for row in closed_orders)

        # Stock came back for every accepted cancel that was refunded or never paid;
        # sales went down for every refunded one; nothing else moved.
        # A lost payment the scanner found was booked as a sale (+) before its refund took it back (-).
        accepted = db_rows(
            db,
            "SELECT o.goods_id, o.quantity, o.pay_status, o.refund_status,"
            " EXISTS (SELECT 1 FROM goods_order2_oplog e WHERE e.order_id = o.id AND e.event = 'PAYMENT_FOUND')"
            " FROM goods_order2 o JOIN req_order_ops q ON q.order_id = o.id AND q.result_code = 'OK'",
        )
        stock_back = {gid: 0 for gid in seeded_goods}
        sales_down = {gid: 0 for gid in seeded_goods}
        for goods_id, qty, paid, refund_status, found in accepted:
            if refund_status == "REFUNDED" or (paid == 0 and refund_status == "NONE"):
                stock_back[goods_id] += qty
            if refund_status == "REFUNDED" and not found:
                sales_down[goods_id] += qty
        # A partial cancel: its units came back and off the sales with its own refund, the order still PAID.
        parts = db_rows(
            db,
            "SELECT o.goods_id, r.quantity, o.order_status FROM refund_order r JOIN goods_order2 o ON o.id = r.order_id"
            " WHERE r.part = 1 AND r.wx_status = 'SUCCESS' AND r.goods_success = 1",
        )
        assert [status for *_, status in parts] == ["PAID"], "the demo seeds one partial cancel"
        for goods_id, units, _status in parts:
            stock_back[goods_id] += units
            sales_down[goods_id] += units
        assert any(found for *_, found in accepted), "the demo seeds a lost payment notification"
        assert sum(stock_back.values()) > 0 and sum(sales_down.values()) > 0
        for goods_id, stock, sales in db_rows(db, "SELECT id, stock, sales FROM goods"):
            stock0, sales0 = seeded_goods[goods_id]
            assert (stock, sales) == (stock0 + stock_back[goods_id], sales0 - sales_down[goods_id]), goods_id
    finally:
        db.dispose()


def test_demo_options_db_orders_seed(tmp_path):
    db_file = tmp_path / "mine.db"
    result, elapsed = run_demo(tmp_path, "--db", str(db_file), "--orders", "13", "--seed", "5")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "seed 5" in result.stdout and "every check passed" in result.stdout
    db = make_engine(f"sqlite:///{db_file}")
    try:
        assert db_rows(db, "SELECT COUNT(*) FROM goods_order2") == [(13,)]
        assert pending(db) == {}
    finally:
        db.dispose()
    assert (tmp_path / "mine.db.log").is_file()


def test_demo_refuses_to_overwrite_an_existing_database(tmp_path):
    existing = tmp_path / "cancel-scanner.db"
    existing.write_bytes(b"precious")
    result, _ = run_demo(tmp_path, "--db", str(existing))
    assert result.returncode == 2
    assert "already exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert existing.read_bytes() == b"precious"


def test_the_hint_the_demo_prints_runs_as_printed_from_the_repository_root(tmp_path):
    """Issue 24, item 4: scripts/demo starts .venv/bin/cancel-scanner, which is not on PATH; its hint said
    `cancel-scanner status` (command not found). Started that way, the hint runs as printed."""
    script = Path(sys.executable).parent / "cancel-scanner"  # the console script of this environment
    env = {k: v for k, v in os.environ.items() if k != "CANCEL_SCANNER_DB_URL"}
    env["PATH"] = "/usr/bin:/bin"  # as a newcomer's shell: the virtual environment is not on it
    env["TMPDIR"] = str(tmp_path)
    demo = run_command([os.path.relpath(script, REPO), "demo", "--orders", "13", "--seed", "7"], REPO, env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    hint = re.search(r"^  (CANCEL_SCANNER_DB_URL=\S+ .+ status)$", demo.stdout, re.MULTILINE)
    assert hint, demo.stdout
    status = subprocess.run(
        hint.group(1), shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    assert status.returncode == 0, (hint.group(1), status.stderr)
    assert "intake" in status.stdout and "待处理" in status.stdout  # the default language: Chinese


def test_the_demo_speaks_chinese_by_default_and_its_checks_are_the_same(tmp_path):
    result, _elapsed = run_demo(tmp_path, "--orders", "13", "--seed", "5", "--locale", "zh_CN")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "撤单申请" in out and "退款（按微信状态）" in out and "所有检查均通过" in out
    assert "没有重复退款：每个 out_refund_no 只创建一次" in out
    assert (
        "ORDER_NOT_FOUND" in out and "找不到该订单（order_id 不存在）" in out
    )  # the code stays; its message is Chinese
    assert "every check passed" not in out
