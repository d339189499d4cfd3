"""`cancel-scanner demo` wired up: the demo's configuration, the real daemon in this process, the watch loop."""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from loguru import logger
from sqlalchemy import Engine, text

from cancel_scanner.config import Config, parse_config
from cancel_scanner.demo.errors import DemoError
from cancel_scanner.demo.plan import DEFAULT_ORDERS, REQUEST_WAVES, Plan, plan_demo
from cancel_scanner.demo.screen import Display, Frame, route_logs
from cancel_scanner.demo.seed import goods_snapshot, insert_requests, seed_shop
from cancel_scanner.demo.stages import DEMO_JOBS
from cancel_scanner.demo.summary import summarize, where_to_look
from cancel_scanner.engine.db import init_schema
from cancel_scanner.engine.runner import utcnow
from cancel_scanner.engine.status import Status, collect_status, format_status
from cancel_scanner.i18n import DEFAULT_LOCALE, N_, tr
from cancel_scanner.scanners import REGISTRY

SETTLE_DEADLINE_SECONDS = 25.0
FRAME_SECONDS = 0.2  # the display refreshes five times a second
WAVE_GAP_SECONDS = 0.4  # the plan's REQUEST_WAVES bursts of merchants' requests arrive this far apart
MERCHANT_REACTION_SECONDS = 0.5  # how long the merchant takes to fix an ABNORMAL refund


def demo_config(db_url: str, locale: str = DEFAULT_LOCALE) -> Config:
    """Built here, never read from jobs.yaml: the demo must work with no configuration at all."""
    raw = {
        "database_url": db_url,
        "locale": locale,
        "shutdown_timeout_seconds": 5,
        "wechat": {"mode": "sandbox", "timeout_seconds": [2, 5], "sandbox": {"success_delay_seconds": 1}},
        "jobs": DEMO_JOBS,
    }
    # An empty env: CANCEL_SCANNER_DB_URL must not send the demo's orders to another database.
    return parse_config(raw, REGISTRY, source="<demo>", env={})


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
    locale: str = DEFAULT_LOCALE,
) -> bool:
    """Run the demo, its screen in ``locale``; True when everything settled and every check held."""
    from cancel_scanner.app import build_app
    from cancel_scanner.engine.daemon import Daemon

    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    seed = random.SystemRandom().randrange(1, 100_000) if seed is None else seed
    plan = plan_demo(orders, seed)
    db_file, log_path = prepare_paths(db_path)
    db_url = f"sqlite:///{db_file}"
    config = demo_config(db_url, locale)
    t = tr(locale)
    display = Display(out, tty, locale)
    started = clock()

    with ExitStack() as stack:
        log_file = stack.enter_context(open(log_path, "a", encoding="utf-8"))
        stack.callback(logger.remove)  # before the file closes: the sinks point at this run's file and screen
        screen_sink = route_logs(log_file, display, log_json, log_level)
        logger.bind(stage="demo", action="start", seed=seed, orders=orders, db=str(db_file)).info("demo starting")

        app = build_app(config, stack)
        init_schema(app.db)
        seed_shop(app.db, plan, utcnow())
        before = goods_snapshot(app.db)
        emulator = app.sandbox.emulator
        register_trades(emulator, plan)
        for o in plan.orders_of("closed"):
            emulator.close_refunds_for(o.order_no)
        for o in plan.orders_of("abnormal"):
            emulator.abnormal_for(o.order_no)

        display.say(
            t(
                N_("cancel-scanner demo: {orders} orders of {goods} goods, {requests} cancel requests (seed {seed})")
            ).format(orders=len(plan.orders), goods=len(plan.goods), requests=len(plan.requests), seed=seed)
        )
        display.say("  " + t(N_("database {path}")).format(path=db_file))
        display.start()
        stack.callback(display.finish)
        daemon = Daemon(app)
        daemon.start()
        try:
            settled, status, elapsed = _watch(app, plan, display, emulator, started, deadline_seconds, clock)
        except KeyboardInterrupt:
            display.finish()
            out.write("\n" + t(N_("interrupted; the database is {path}")).format(path=db_file) + "\n")
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
        summary, ok = summarize(app.db, plan, before, emulator, elapsed, locale)
        out.write("\n" + summary)
        out.write(where_to_look(db_file, log_path, display.warnings, locale))
        out.flush()
        return ok


def register_trades(emulator, plan: Plan) -> None:
    """WeChat's side of every order: paid ones paid; unpaid ones NOTPAY; a lost payment paid at
    WeChat while the shop's row still says unpaid (nobody tells the database)."""
    for o in plan.orders:
        if o.paid and o.amount:
            emulator.register_payment(o.order_no, o.amount, f"4200000{o.id:012d}")
        elif not o.paid:
            emulator.create_trade(o.order_no, o.amount)
            if o.kind == "lost_payment":
                emulator.user_pays(o.order_no)


def _watch(
    app, plan: Plan, display: Display, emulator, started: float, deadline: float, clock
) -> tuple[bool, Status, float]:
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
        status = collect_status(app.db, stages, utcnow(), totals=True)
        frame = Frame(
            elapsed,
            inserted,
            len(plan.requests),
            status,
            expected,
            _wx_states(app.db),
            sum(emulator.refunds_created.values()),
        )
        settled = not waves and all(s.pending == 0 for s in status.stages)
        if settled or elapsed > deadline:
            display.show(frame, final=True)
            return settled, status, elapsed
        display.show(frame)
        time.sleep(FRAME_SECONDS)
