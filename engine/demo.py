"""`cancel-scanner demo`: the whole flow on a fresh SQLite file and the sandbox gateway, in seconds.

No server, no credentials, no jobs.yaml: the demo builds its own configuration
(short intervals, a refund succeeds one second after it is accepted), seeds goods
and orders as the shop's order system would, inserts merchants' cancel requests
as their tools would (four columns, trickled in), and runs the real daemon in
this process until every stage has nothing pending. It then checks what it can
prove (no refund created twice, money moved = refunds SUCCESS, stock and sales
moved by exactly the cancelled quantities) and prints a summary.

The screen is a progress display, not a log: every log record goes to a file
next to the database, and only warnings and errors are echoed above the
progress lines.
"""

from __future__ import annotations

import random
import shlex
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, TextIO

from loguru import logger
from sqlalchemy import Engine, text

from engine.config import Config, parse_config
from engine.db import init_schema
from engine.runner import utcnow
from engine.status import Status, collect_status, format_status

MIN_ORDERS = 12  # one of each rejected kind, two CLOSED, one ABNORMAL, and some ordinary ones
MAX_ORDERS = 500  # beyond this the demo would not settle in seconds on a small machine
DEFAULT_ORDERS = 40
SETTLE_DEADLINE_SECONDS = 25.0
FRAME_SECONDS = 0.2  # the display refreshes five times a second
PLAIN_LINE_EVERY_SECONDS = 1.0  # without a terminal: one progress line a second at most
REQUEST_WAVES = 4  # merchants' requests arrive in this many bursts...
WAVE_GAP_SECONDS = 0.4  # ...this far apart
MERCHANT_REACTION_SECONDS = 0.5  # how long the merchant takes to fix an ABNORMAL refund
BAR_CELLS = 16
WIDTH = 80

DEMO_JOBS = {
    "intake": {"interval_seconds": 0.3, "batch_size": 10, "retry_delays_seconds": [0.5, 1]},
    "submit_refund": {"interval_seconds": 0.3, "batch_size": 20, "concurrency": 8, "retry_delays_seconds": [0.5, 1]},
    "poll_refund": {
        "interval_seconds": 0.3,
        "batch_size": 50,
        "concurrency": 8,
        "retry_delays_seconds": [0.5, 1],
        "poll_delays_seconds": [0.5, 1],
    },
    "sync_result": {"interval_seconds": 0.3, "batch_size": 20, "retry_delays_seconds": [0.5, 1]},
    "restore_stock": {"interval_seconds": 0.3, "batch_size": 20, "retry_delays_seconds": [0.5, 1]},
    "decrement_sales": {"interval_seconds": 0.3, "batch_size": 20, "retry_delays_seconds": [0.5, 1]},
}

# What the shop sells: (name, price in fen, stock, sales before the demo's orders, which add to sales).
GOODS = (
    ("龙井茶 Longjing tea 250g", 12800, 120, 860),
    ("紫砂壶 Yixing teapot", 38800, 35, 210),
    ("青花瓷杯 Porcelain cup", 4500, 300, 1540),
    ("竹茶盘 Bamboo tea tray", 16800, 60, 385),
)
OPERATORS = ("clerk-li", "clerk-wang", "shop-admin")
REASONS = ("缺货 out of stock", "customer asked by phone", "地址错误 wrong address", "duplicate order")

# The order kinds the demo seeds, and what intake must answer for each.
ACCEPTED_KINDS = ("paid", "unpaid", "closed", "abnormal")
REJECTED_KINDS = {
    "shipped": "ORDER_SHIPPED",
    "completed": "ORDER_SHIPPED",
    "deleted": "ORDER_DELETED",
    "zero_amount": "BAD_AMOUNT",
    "cancelled_before": "ALREADY_CANCELLED",
    "unsupported_op": "UNSUPPORTED_OP",
}
UNKNOWN_ORDER_CODE = "ORDER_NOT_FOUND"
DUPLICATE_CODE = "DUPLICATE_REQUEST"
STAGE_FAILED_LABEL = {"intake": "rejected", "poll_refund": "closed"}


class DemoError(Exception):
    """A bad demo option (the CLI exits 2 with this one line)."""


# --- the plan: what to seed, decided up front from the seed alone ---------------------------------


@dataclass(frozen=True)
class Goods:
    id: int
    name: str
    price: int
    stock: int
    sales: int


@dataclass(frozen=True)
class Order:
    id: int
    kind: str  # one of ACCEPTED_KINDS or REJECTED_KINDS
    order_no: str
    goods_id: int
    quantity: int
    amount: int
    paid: bool

    @property
    def refunded(self) -> bool:
        """Money goes back, so stock comes back and sales go down."""
        return self.kind in ("paid", "abnormal")

    @property
    def stock_back(self) -> bool:
        return self.refunded or self.kind == "unpaid"


@dataclass(frozen=True)
class Request:
    order_id: int
    op_type: str
    operator: str
    reason: str
    expect: str  # the result_code intake must write


@dataclass
class Plan:
    seed: int
    goods: list[Goods]
    orders: list[Order]
    waves: list[list[Request]]

    @property
    def requests(self) -> list[Request]:
        return [r for wave in self.waves for r in wave]

    def orders_of(self, kind: str) -> list[Order]:
        return [o for o in self.orders if o.kind == kind]

    def expected_totals(self) -> dict[str, int]:
        """Rows each stage will finish, for the progress bars."""
        refunds = sum(1 for o in self.orders if o.kind in ("paid", "closed", "abnormal"))
        return {
            "intake": len(self.requests),
            "submit_refund": refunds,
            "poll_refund": refunds,
            "sync_result": refunds,
            "restore_stock": sum(1 for o in self.orders if o.stock_back),
            "decrement_sales": sum(1 for o in self.orders if o.refunded),
        }

    def expected_goods(self) -> dict[int, tuple[int, int]]:
        """goods id -> (stock, sales) once everything settled."""
        after = {g.id: [g.stock, g.sales] for g in self.goods}
        for o in self.orders:
            if o.stock_back:
                after[o.goods_id][0] += o.quantity
            if o.refunded:
                after[o.goods_id][1] -= o.quantity
        return {gid: (s, q) for gid, (s, q) in after.items()}


def plan_demo(orders: int, seed: int) -> Plan:
    """Goods, ``orders`` orders and their cancel requests; the same seed gives the same plan."""
    if not MIN_ORDERS <= orders <= MAX_ORDERS:
        raise DemoError(f"--orders: must be between {MIN_ORDERS} and {MAX_ORDERS}, got {orders}")
    rng = random.Random(seed)
    catalogue = [Goods(i, name, price, stock, sales) for i, (name, price, stock, sales) in enumerate(GOODS, start=1)]
    special = list(REJECTED_KINDS) + ["closed", "closed", "abnormal"]
    ordinary = orders - len(special)
    unpaid = max(1, round(ordinary * 0.25))
    kinds = special + ["unpaid"] * unpaid + ["paid"] * (ordinary - unpaid)
    rng.shuffle(kinds)

    planned: list[Order] = []
    for n, kind in enumerate(kinds):
        order_id = 1001 + n
        g = rng.choice(catalogue)
        qty = rng.choice((1, 1, 1, 2, 2, 3))
        paid = kind not in ("unpaid", "cancelled_before")
        amount = 0 if kind == "zero_amount" else g.price * qty
        planned.append(Order(order_id, kind, f"SO{order_id:08d}", g.id, qty, amount, paid))

    requests: list[Request] = []
    for o in planned:
        op_type = "USER_CANCEL" if rng.random() < 0.2 else "MERCHANT_CANCEL"
        if o.kind == "unsupported_op":
            op_type = "PARTIAL_REFUND"
        requests.append(
            Request(o.id, op_type, rng.choice(OPERATORS), rng.choice(REASONS), REJECTED_KINDS.get(o.kind, "OK"))
        )
    unknown_id = 1001 + orders + 500
    requests.append(Request(unknown_id, "MERCHANT_CANCEL", "clerk-li", "typo in the order id", UNKNOWN_ORDER_CODE))
    rng.shuffle(requests)
    waves = [requests[i::REQUEST_WAVES] for i in range(REQUEST_WAVES)]
    # A second clerk cancels an order that is already on its way: it must not refund twice.
    twice = rng.choice([o for o in planned if o.kind == "paid"])
    waves[-1].append(Request(twice.id, "MERCHANT_CANCEL", "clerk-wang", "customer asked again", DUPLICATE_CODE))
    # Every paid order was a sale: the shop's figures already count it.
    sold = Counter()
    for o in planned:
        if o.paid:
            sold[o.goods_id] += o.quantity
    goods = [Goods(g.id, g.name, g.price, g.stock, g.sales + sold[g.id]) for g in catalogue]
    return Plan(seed=seed, goods=goods, orders=planned, waves=waves)


# --- seeding: plain SQL, only the columns the shop's systems write --------------------------------


def _sql_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed_shop(db: Engine, plan: Plan, now: datetime) -> None:
    rng = random.Random(plan.seed + 1)
    with db.begin() as conn:
        conn.execute(
            text("INSERT INTO goods (id, name, stock, sales) VALUES (:id, :name, :stock, :sales)"),
            [{"id": g.id, "name": g.name, "stock": g.stock, "sales": g.sales} for g in plan.goods],
        )
        conn.execute(
            text(
                "INSERT INTO goods_order2 (id, order_no, user_id, merchant_id, goods_id, quantity, total_amount,"
                " pay_status, transaction_id, paid_at, order_status, is_deleted)"
                " VALUES (:id, :no, :user, 9, :goods, :qty, :amount, :pay, :txn, :paid_at, :status, :deleted)"
            ),
            [
                {
                    "id": o.id,
                    "no": o.order_no,
                    "user": rng.randint(10_000, 99_999),
                    "goods": o.goods_id,
                    "qty": o.quantity,
                    "amount": o.amount,
                    "pay": 1 if o.paid else 0,
                    "txn": f"4200000{o.id:012d}" if o.paid else None,
                    "paid_at": _sql_time(now - timedelta(hours=rng.uniform(1, 72))) if o.paid else None,
                    "status": {"shipped": "SHIPPED", "completed": "COMPLETED", "cancelled_before": "CANCELLED"}.get(
                        o.kind, "PAID" if o.paid else "UNPAID"
                    ),
                    "deleted": 1 if o.kind == "deleted" else 0,
                }
                for o in plan.orders
            ],
        )
        # The user cancelled this one in the app yesterday and the scanner handled it then:
        # history, so today's request for it is the one that must be turned away.
        conn.execute(
            text(
                "UPDATE goods_order2 SET cancel_source = 'USER', cancelled_at = :at, stock_scanned = 1, stock_success = 1"
                " WHERE order_status = 'CANCELLED'"
            ),
            {"at": _sql_time(now - timedelta(days=1))},
        )


def insert_requests(db: Engine, requests: list[Request]) -> None:
    """What a merchant's tool does: four columns, nothing else."""
    if not requests:
        return
    with db.begin() as conn:
        for r in requests:  # one statement each, so ids follow arrival order
            conn.execute(
                text("INSERT INTO req_order_ops (order_id, op_type, operator, reason) VALUES (:o, :t, :op, :r)"),
                {"o": r.order_id, "t": r.op_type, "op": r.operator, "r": r.reason},
            )


def goods_snapshot(db: Engine) -> dict[int, tuple[str, int, int]]:
    with db.connect() as conn:
        return {r.id: (r.name, r.stock, r.sales) for r in conn.execute(text("SELECT id, name, stock, sales FROM goods"))}


# --- the screen ------------------------------------------------------------------------------------


def cells(s: str) -> int:
    """Terminal columns ``s`` takes: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in s)


def fit(s: str, width: int) -> str:
    """Cut ``s`` to ``width`` columns, marking the cut."""
    if cells(s) <= width:
        return s
    out, used = [], 0
    for ch in s:
        w = cells(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(s: str, width: int) -> str:
    s = fit(s, width)
    return s + " " * (width - cells(s))


def yuan(fen: int) -> str:
    return f"¥{fen / 100:,.2f}"


@dataclass
class Frame:
    elapsed: float
    inserted: int
    total_requests: int
    status: Status
    expected: dict[str, int]
    wx: Counter  # refund_order.wx_status -> count ("" while not yet answered)
    created: int  # refunds the emulator created


class Display:
    """A block of progress lines, redrawn in place on a terminal; a compact line a second otherwise.

    Log records and notes are printed above the block, so they never tear it.
    """

    def __init__(self, out: TextIO, tty: bool):
        self.out = out
        self.tty = tty
        self._lock = threading.Lock()
        self._drawn = 0
        self._last_plain = -PLAIN_LINE_EVERY_SECONDS
        self._last_plain_text = ""
        self._block: list[str] = []
        self._hidden = False
        self.warnings = 0

    def _width(self) -> int:
        return max(40, min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns) - 1)

    def _erase(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        width = self._width()
        for line in self._block:
            self.out.write(fit(line, width) + "\x1b[K\n")
        self._drawn = len(self._block)
        self.out.flush()

    def start(self) -> None:
        if self.tty:
            self.out.write("\x1b[?25l")  # hide the cursor while redrawing
            self._hidden = True

    def finish(self) -> None:
        with self._lock:
            if self._hidden:
                self.out.write("\x1b[?25h")
                self._hidden = False
            self.out.flush()

    def say(self, line: str) -> None:
        """A line that stays on screen, above the progress block."""
        with self._lock:
            if self.tty:
                self._erase()
                self.out.write(fit(line, self._width()) + "\x1b[K\n")
                self._draw()
            else:
                self.out.write(line + "\n")
                self.out.flush()

    def log_sink(self, message: Any) -> None:
        record = message.record
        self.warnings += 1
        stage = record["extra"].get("stage", "-")
        ref = record["extra"].get("out_refund_no")
        self.say(f"  {record['level'].name.lower()} {stage}: {record['message']}" + (f" [{ref}]" if ref else ""))

    def show(self, frame: Frame, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                self._erase()
                self._block = render_block(frame)
                self._draw()
                return
            body = render_plain(frame)
            due = frame.elapsed - self._last_plain >= PLAIN_LINE_EVERY_SECONDS
            if final or (due and body != self._last_plain_text):
                self.out.write(f"{frame.elapsed:5.1f}s  {body}\n")
                self.out.flush()
                self._last_plain = frame.elapsed
                self._last_plain_text = body


def _bar(done: int, total: int) -> str:
    filled = BAR_CELLS if total <= 0 else min(BAR_CELLS, round(BAR_CELLS * done / total))
    return "█" * filled + "░" * (BAR_CELLS - filled)


def render_block(f: Frame) -> list[str]:
    lines = [
        f"cancel-scanner demo  {f.elapsed:5.1f}s   merchants' requests arrived {f.inserted}/{f.total_requests}",
        "",
    ]
    for s in f.status.stages:
        finished = s.done + s.failed
        total = max(f.expected.get(s.stage, 0), finished + s.pending)
        label = STAGE_FAILED_LABEL.get(s.stage, "failed")
        lines.append(
            f"  {s.stage:16}{_bar(finished, total)} {finished:3}/{total:<3}"
            f"  done {s.done:<3} {label:>8} {s.failed:<3} pending {s.pending}"
        )
    states = "  ".join(f"{k} {v}" for k, v in sorted(f.wx.items()) if k)
    lines += ["", f"  WeChat Pay sandbox: {f.created} refunds created   {states}"]
    return lines


_SHORT = {"intake": "in", "submit_refund": "sub", "poll_refund": "poll", "sync_result": "sync",
          "restore_stock": "stock", "decrement_sales": "sales"}


def render_plain(f: Frame) -> str:
    """One compact progress line (without the time): finished/total per stage."""
    parts = []
    for s in f.status.stages:
        finished = s.done + s.failed
        parts.append(f"{_SHORT.get(s.stage, s.stage)} {finished}/{max(f.expected.get(s.stage, 0), finished + s.pending)}")
    return f"req {f.inserted}/{f.total_requests}  " + " ".join(parts)


# --- running -------------------------------------------------------------------------------------


def demo_config(db_url: str) -> Config:
    """Built here, never read from jobs.yaml: the demo must work with no configuration at all."""
    raw = {
        "database_url": db_url,
        "shutdown_timeout_seconds": 5,
        "wechat": {"mode": "sandbox", "timeout_seconds": [2, 5], "sandbox": {"success_delay_seconds": 1}},
        "jobs": DEMO_JOBS,
    }
    # An empty env: CANCEL_SCANNER_DB_URL must not send the demo's orders to another database.
    return parse_config(raw, source="<demo>", env={})


def prepare_paths(db_path: Path | None) -> tuple[Path, Path]:
    """The database file to create and the log file; the default is a new temporary directory."""
    if db_path is None:
        workdir = Path(tempfile.mkdtemp(prefix="cancel-scanner-demo-"))
        return workdir / "demo.db", workdir / "demo.log"
    db_path = db_path.expanduser().resolve()
    if db_path.exists():
        raise DemoError(f"--db: {db_path} already exists; the demo creates a fresh database (pick a new path)")
    if not db_path.parent.is_dir():
        raise DemoError(f"--db: directory {db_path.parent} does not exist")
    return db_path, db_path.with_name(db_path.name + ".log")


def _route_logs(log_file: TextIO, display: Display, json_lines: bool, level: str) -> int:
    """Every record to the file; warnings and errors also above the progress block. Returns the screen sink."""
    from engine.logs import setup_logging

    setup_logging(json_lines=json_lines, level=level, stream=log_file)

    def on_screen(record) -> bool:
        # APScheduler's own chatter (a skipped overlapping run) stays in the file.
        return not str(record["extra"].get("stage", "")).startswith("apscheduler")

    return logger.add(display.log_sink, level="WARNING", filter=on_screen, format="{message}", enqueue=False, diagnose=False)


def _wx_states(db: Engine) -> Counter:
    with db.connect() as conn:
        rows = conn.execute(text("SELECT COALESCE(wx_status, ''), COUNT(*) FROM refund_order GROUP BY 1")).all()
    return Counter({k: v for k, v in rows})


def _abnormal_orders(db: Engine) -> list[str]:
    with db.connect() as conn:
        return list(
            conn.execute(
                text("SELECT out_trade_no FROM refund_order WHERE wx_status = 'ABNORMAL' AND progress_scanned = 0")
            ).scalars()
        )


def run_demo(
    *,
    db_path: Path | None = None,
    orders: int = DEFAULT_ORDERS,
    seed: int | None = None,
    out: TextIO | None = None,
    tty: bool | None = None,
    log_json: bool = False,
    log_level: str = "INFO",
    deadline_seconds: float = SETTLE_DEADLINE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Run the demo; True when everything settled and every check held."""
    from engine.app import build_app
    from engine.daemon import Daemon

    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    seed = random.SystemRandom().randrange(1, 100_000) if seed is None else seed
    plan = plan_demo(orders, seed)
    db_file, log_path = prepare_paths(db_path)
    db_url = f"sqlite:///{db_file}"
    config = demo_config(db_url)
    display = Display(out, tty)
    started = clock()

    with ExitStack() as stack:
        log_file = stack.enter_context(open(log_path, "a", encoding="utf-8"))
        stack.callback(logger.remove)  # before the file closes: the sinks point at this run's file and screen
        screen_sink = _route_logs(log_file, display, log_json, log_level)
        logger.bind(stage="demo", action="start", seed=seed, orders=orders, db=str(db_file)).info("demo starting")

        app = build_app(config, stack)
        init_schema(app.db)
        seed_shop(app.db, plan, utcnow())
        before = goods_snapshot(app.db)
        emulator = app.sandbox.emulator
        for o in plan.orders_of("closed"):
            emulator.close_refunds_for(o.order_no)
        for o in plan.orders_of("abnormal"):
            emulator.abnormal_for(o.order_no)

        display.say(
            f"cancel-scanner demo: {len(plan.orders)} orders of {len(plan.goods)} goods, "
            f"{len(plan.requests)} cancel requests (seed {seed})"
        )
        display.say(f"  database {db_file}")
        display.start()
        stack.callback(display.finish)
        daemon = Daemon(app)
        daemon.start()
        try:
            settled, status, elapsed = _watch(app, plan, display, emulator, started, deadline_seconds, clock)
        except KeyboardInterrupt:
            display.finish()
            out.write(f"\ninterrupted; the database is {db_file}\n")
            return False
        finally:
            daemon.shutdown()
        display.finish()
        logger.remove(screen_sink)  # the summary is not to be torn by a late log line
        if not settled:
            out.write(f"\nnot settled after {deadline_seconds:.0f} s; still pending:\n{format_status(status)}\n")
            out.write(f"\ndatabase {db_file}\nlog      {log_path}\n")
            out.flush()
            return False
        summary, ok = summarize(app.db, plan, before, emulator, elapsed)
        out.write("\n" + summary)
        out.write(_where(db_file, log_path, display.warnings))
        out.flush()
        return ok


def _watch(app, plan: Plan, display: Display, emulator, started: float, deadline: float, clock) -> tuple[bool, Status, float]:
    """Feed the requests in, redraw, let the merchant fix ABNORMAL refunds, until nothing is pending."""
    stages = app.runner.stages
    expected = plan.expected_totals()
    waves = list(plan.waves)
    inserted = 0
    abnormal_seen: dict[str, float] = {}
    while True:
        elapsed = clock() - started
        while waves and elapsed >= (REQUEST_WAVES - len(waves)) * WAVE_GAP_SECONDS:
            wave = waves.pop(0)
            insert_requests(app.db, wave)
            inserted += len(wave)
        for order_no in _abnormal_orders(app.db):
            first = abnormal_seen.setdefault(order_no, elapsed)
            if elapsed - first >= MERCHANT_REACTION_SECONDS and emulator.resolve_abnormal(order_no):
                display.say(f"  note merchant: fixed the ABNORMAL refund of order {order_no} (frozen account)")
        status = collect_status(app.db, stages, utcnow())
        frame = Frame(elapsed, inserted, len(plan.requests), status, expected, _wx_states(app.db),
                      sum(emulator.refunds_created.values()))
        settled = not waves and all(s.pending == 0 for s in status.stages)
        if settled or elapsed > deadline:
            display.show(frame, final=True)
            return settled, status, elapsed
        display.show(frame)
        time.sleep(FRAME_SECONDS)


# --- the summary ---------------------------------------------------------------------------------


def _rows(db: Engine, sql: str) -> list:
    with db.connect() as conn:
        return list(conn.execute(text(sql)).all())


# Rejection codes in the contract's order; anything else after them.
CODE_ORDER = ("ORDER_NOT_FOUND", "ALREADY_CANCELLED", "ORDER_SHIPPED", "ORDER_DELETED", "UNSUPPORTED_OP",
              "BAD_AMOUNT", "DUPLICATE_REQUEST")
LABEL, COUNT, AMOUNT = 26, 6, 12  # the summary's columns


def _code_rank(code: str) -> tuple[int, str]:
    return (CODE_ORDER.index(code) if code in CODE_ORDER else len(CODE_ORDER), code)


def summarize(db: Engine, plan: Plan, before: dict, emulator, elapsed: float) -> tuple[str, bool]:
    """The closing screen, and whether every check held."""
    lines: list[str] = []
    problems: list[str] = []

    def add(line: str = "") -> None:
        lines.append(fit(line, WIDTH))

    # Cancel requests: accepted, and rejected by code with the message the merchant reads.
    reqs = _rows(
        db,
        "SELECT q.result_code, q.result_msg, o.pay_status FROM req_order_ops q"
        " LEFT JOIN goods_order2 o ON o.id = q.order_id ORDER BY q.id",
    )
    accepted = [r for r in reqs if r.result_code == "OK"]
    rejected = [r for r in reqs if r.result_code != "OK"]
    paid_ok = sum(1 for r in accepted if r.pay_status == 1)
    add(f"{'Cancel requests':{LABEL}}{'count':>{COUNT}}")
    add(f"  {'accepted (OK)':{LABEL - 2}}{len(accepted):{COUNT}}   "
        f"{paid_ok} paid: refund; {len(accepted) - paid_ok} unpaid: no refund")
    add(f"  {'rejected':{LABEL - 2}}{len(rejected):{COUNT}}   code and the message the merchant reads:")
    by_code: dict[str, list] = {}
    for r in rejected:
        by_code.setdefault(r.result_code or "(none)", []).append(r)
    for code in sorted(by_code, key=_code_rank):
        head = f"    {code:{LABEL - 4}}{len(by_code[code]):{COUNT}}   "
        message = textwrap.wrap(by_code[code][0].result_msg or "", WIDTH - len(head)) or [""]
        add(head + message[0])
        for more in message[1:]:
            add(" " * len(head) + more)
    got = Counter(r.result_code for r in reqs)
    want = Counter(r.expect for r in plan.requests)
    if got != want:
        problems.append(f"result codes {dict(got)} differ from the seeded cases {dict(want)}")

    # Refunds by WeChat's final word.
    refunds = _rows(db, "SELECT wx_status, COUNT(*) AS n, SUM(refund_amount) AS fen FROM refund_order GROUP BY wx_status")
    notes = {"SUCCESS": "paid back to the user", "CLOSED": "no money moved: order FAILED,", "ABNORMAL": "merchant must act"}
    add()
    add(f"{'Refunds by WeChat status':{LABEL}}{'count':>{COUNT}}{'amount':>{AMOUNT}}")
    for r in sorted(refunds, key=lambda r: (r.wx_status != "SUCCESS", r.wx_status or "")):
        status = r.wx_status or "(no answer yet)"
        add(f"  {status:{LABEL - 2}}{r.n:{COUNT}}{yuan(r.fen or 0):>{AMOUNT}}   {notes.get(r.wx_status, '')}")
        if r.wx_status == "CLOSED":
            add(" " * (LABEL + COUNT + AMOUNT + 3) + "stock and sales untouched")
        if r.wx_status == "SUCCESS" and plan.orders_of("abnormal"):
            add(" " * (LABEL + COUNT + AMOUNT + 3) + f"incl. {len(plan.orders_of('abnormal'))} that was ABNORMAL first")
    add(f"  {'total':{LABEL - 2}}{sum(r.n for r in refunds):{COUNT}}{yuan(sum(r.fen or 0 for r in refunds)):>{AMOUNT}}")
    success_fen = sum(r.fen or 0 for r in refunds if r.wx_status == "SUCCESS")

    # Orders, as the shop's order system now sees them.
    orders = _rows(
        db,
        "SELECT order_status, refund_status, is_deleted, COUNT(*) AS n FROM goods_order2"
        " GROUP BY order_status, refund_status, is_deleted ORDER BY order_status, refund_status, is_deleted",
    )
    add()
    add(f"{'Orders':18}{'refund_status':14}{'count':>{COUNT}}")
    for r in orders:
        label = f"{r.order_status}{' (deleted)' if r.is_deleted else ''}"
        add(f"  {label:16}{r.refund_status:14}{r.n:{COUNT}}")

    # Goods: what came back on the shelf, what no longer counts as sold.
    after = goods_snapshot(db)
    expected = plan.expected_goods()
    add()
    add(f"{'Goods':{LABEL + 2}}{'stock before → after':24}{'sales before → after'}")
    for gid, (name, stock0, sales0) in sorted(before.items()):
        _, stock1, sales1 = after[gid]
        stock = f"{stock0:>5} → {stock1:<5}({stock1 - stock0:+d})"
        sales = f"{sales0:>5} → {sales1:<5}({sales1 - sales0:+d})"
        add(f"  {pad(name, LABEL)}{stock:24}{sales}")
        if (stock1, sales1) != expected[gid]:
            problems.append(f"goods {gid}: stock/sales {stock1}/{sales1}, expected {expected[gid][0]}/{expected[gid][1]}")

    # The gateway's side: the proof that nothing was paid twice.
    created = emulator.refunds_created
    twice = sorted(no for no, n in created.items() if n > 1)
    moved = sum(emulator.fen_refunded.values())
    add()
    add(f"WeChat Pay sandbox: {sum(created.values())} refunds created for {len(created)} refund numbers")
    if twice:
        add(f"  REFUND SENT TWICE: {', '.join(twice)}")
        problems.append(f"refund numbers created more than once: {', '.join(twice)}")
    else:
        add("  no refund sent twice: each out_refund_no created exactly once")
    if moved == success_fen:
        add(f"  money moved {yuan(moved)} = refunds SUCCESS in the database")
    else:
        add(f"  MONEY MOVED {yuan(moved)}, but refunds SUCCESS in the database total {yuan(success_fen)}")
        problems.append("money moved at the gateway differs from the refunds marked SUCCESS")

    add()
    if problems:
        add("CHECKS FAILED:")
        lines.extend(f"  {p}" for p in problems)
    else:
        add(f"All settled in {elapsed:.1f} s; every check passed.")
    return "\n".join(lines) + "\n", not problems


def _this_command() -> str:
    """How the user started us, so the hint can be pasted: the console script, or python cli.py."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is None or argv0.suffix != ".py":
        return "cancel-scanner"
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(argv0.resolve()))}"


def _where(db_file: Path, log_path: Path, warnings: int) -> str:
    shown = f" ({warnings} warnings/errors shown above)" if warnings else ""
    url = shlex.quote(f"sqlite:///{db_file}")
    return (
        f"\nDatabase  {db_file}\n"
        f"  inspect it with:\n  CANCEL_SCANNER_DB_URL={url} {_this_command()} status\n"
        f"Log       {log_path}{shown}\n"
    )
