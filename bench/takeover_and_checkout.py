"""Takeover after kill -9, and a shop checkout's wait on a goods row restore_stock is restoring.

1. Takeover. A survivor daemon runs; each round a victim daemon starts beside it (both
   ``cancel-scanner run`` in live mode, the acceptance tests' fast jobs, submit_refund
   concurrency 4, lease_seconds 120) against one MariaDB and the emulator in this process
   (tests/acceptance/harness.py: every call takes 0.3-0.6 s, so calls are in flight). The
   round's refunds are seeded ready for submit_refund; once the victim holds leases (its owner
   id is in its "started" log record, its leases are refund_order rows with lease_owner = it),
   it is killed with SIGKILL. Takeover time = from the kill until no refund_order row is leased
   by the victim's owner id any more; then until every row it held is done (its WeChat call
   made again by the survivor and the answer written). Reported: median and max over the kills,
   against lease_seconds (what takeover would take if leases had to expire) and against the
   registry's takeover_seconds (10 s).

2. Checkout. A shop's checkout, ``UPDATE goods SET stock = stock - 1 WHERE id = ?`` (autocommit,
   one statement each, timed with time.perf_counter), in a loop on its own connection, one due
   every ``--gap-ms`` ms for ``--seconds`` s, on: the hot goods row while the daemon is idle; the
   same row while the daemon's restore_stock (``cancel-scanner run``, only that stage, batch_size
   500) restores ``--orders`` cancelled unpaid orders, half of them for that goods, in full
   batches; a goods row no pending order touches while the daemon is busy the same way; that
   cold row with the daemon idle. Reported: p50/p99/max of each and p99(busy) / p99(idle) per
   row. Then the hot row once more, idle and busy, with each checkout on the next free of
   ``--shoppers`` connections (shoppers arriving on a timetable, whoever else waits): the wait
   from when a checkout was due, i.e. what one arriving at a random moment sees.

   --orders defaults to 200,000 rather than 50,000: restore_stock drains ~15,000 rows/s here, so
   50,000 would keep it busy for ~3 s of the 10 s loop. A busy phase stops early (and says so) if
   no row is ready any more.

    .venv/bin/python -m bench.takeover_and_checkout [--quick] [--kills 10] [--orders 200000] [--seconds 10]
        [--gap-ms 2] [--shoppers 32] [--only takeover|checkout]
"""

from __future__ import annotations

import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import OUT_DIR, configs, database, reporting, seed
from cancel_scanner.engine.registry import DEFAULT_TAKEOVER_SECONDS
from tests.acceptance import harness
from testsupport.processes import DaemonProcess, LogFollower
from testsupport.waiting import wait_until

WORKDIR = OUT_DIR / "takeover_and_checkout"

# 1. takeover
LEASE_SECONDS = 120
CONCURRENCY = 4
SUBMIT_BATCH = 40  # rows a daemon leases at once (the acceptance test's)
LATENCY_SECONDS = (0.3, 0.6)  # per call, drawn uniformly by the emulator
REFUNDS_PER_ROUND = 120  # both daemons lease a batch at once, a third is left for whoever is free
TAKEOVER_BOUND_SECONDS = 15  # tests/acceptance/test_clocks_and_takeover.py
POLL_SECONDS = 0.02

# 2. checkout
HOT_GOODS = 1
COLD_GOODS = seed.N_GOODS + 1  # seeded, but no order is for it
RESTORE_BATCH = 500
CHECKOUT_SQL = "UPDATE goods SET stock = stock - 1 WHERE id = %s"
_PENDING = (
    "stock_scanned = 0 AND stock_success = 0 AND order_status = 'CANCELLED' AND refund_status IN ('NONE', 'REFUNDED') "
    "AND is_deleted = 0 AND id BETWEEN %s AND %s"
)
PENDING_SQL = f"SELECT EXISTS (SELECT 1 FROM goods_order2 WHERE {_PENDING})"
# Ready now: rows answered Later (their goods row was busy) wait out their retry at the next interval,
# while the daemon is idle; the busy phases end when only those are left.
READY_SQL = (
    f"SELECT EXISTS (SELECT 1 FROM goods_order2 WHERE {_PENDING} "
    "AND (stock_next_attempt_at IS NULL OR stock_next_attempt_at <= NOW(3)))"
)
BUSY_CHECK_SECONDS = 0.1
BLOCKED_MS = 5.0  # a checkout this slow waited for a lock (idle ones take well under 1 ms)


# --- 1. takeover after kill -9 -------------------------------------------------------------------


def owner_of(daemon: DaemonProcess) -> str:
    return next(r["owner"] for r in daemon.logs() if r.get("action") == "started")


def leased_by(conn, owner: str) -> int:
    return database.scalar(conn, "SELECT COUNT(*) FROM refund_order WHERE lease_owner = %s", (owner,))


def one_kill(
    conn, db, emu: harness.ExternalEmulator, config: dict, survivor: DaemonProcess, k: int, lo: int, hi: int
) -> dict:
    victim = DaemonProcess(WORKDIR, config, emu.env(), name=f"victim-{k}").start()
    try:
        victim.wait_started(60)
        owner = owner_of(victim)
        seed.orders(conn, lo, hi, "refunding")
        seed.requests(conn, lo, hi, "finished")
        seed.refunds(conn, lo, hi, "submit")
        seed.oplog(conn, lo, hi, ("CANCELLED",))
        # Leased for submit_refund: the victim has (or is about to have) calls in flight for them.
        wait_until(
            lambda: database.scalar(
                conn, "SELECT COUNT(*) FROM refund_order WHERE lease_owner = %s AND submit_scanned = 0", (owner,)
            ),
            60,
            f"victim {k} to hold leases",
            until=lambda n: n > 0,
            interval=POLL_SECONDS,
            daemons=[victim, survivor],
        )
        killed_at = time.monotonic()
        victim.kill9()
    finally:
        victim.close()
    held = database.sql(conn, "SELECT id, submit_scanned FROM refund_order WHERE lease_owner = %s", (owner,))
    submit_ids = [i for i, s in held if s == 0]
    poll_ids = [i for i, s in held if s == 1]
    released = None
    try:
        wait_until(
            lambda: leased_by(conn, owner),
            LEASE_SECONDS + 30,
            f"victim {k}'s leases released",
            until=lambda n: n == 0,
            interval=POLL_SECONDS,
            daemons=[survivor],
        )
        released = time.monotonic() - killed_at
    except AssertionError as exc:
        print(f"[takeover] round {k}: {exc}", flush=True)

    def not_done() -> int:
        n = 0
        if submit_ids:
            ids = ",".join(map(str, submit_ids))
            n += database.scalar(conn, f"SELECT COUNT(*) FROM refund_order WHERE submit_scanned = 0 AND id IN ({ids})")
        if poll_ids:
            ids = ",".join(map(str, poll_ids))
            n += database.scalar(
                conn, f"SELECT COUNT(*) FROM refund_order WHERE progress_scanned = 0 AND id IN ({ids})"
            )
        return n

    done = None
    if released is not None:
        wait_until(
            not_done, 120, f"victim {k}'s rows done", until=lambda n: n == 0, interval=POLL_SECONDS, daemons=[survivor]
        )
        done = time.monotonic() - killed_at
    ids = ",".join(map(str, submit_ids + poll_ids)) or "0"
    failed = database.scalar(
        conn,
        f"SELECT COUNT(*) FROM refund_order WHERE id IN ({ids}) AND "
        "((submit_scanned = 1 AND submit_success = 0) OR (progress_scanned = 1 AND progress_success = 0))",
    )
    # The round is over when every stage is (the next victim finds nothing of this one's left).
    wait_until(
        lambda: harness.pending_counts(db), 180, f"round {k} to settle", until=lambda p: p == {}, daemons=[survivor]
    )
    reaped = [r for r in survivor.logs() if r.get("action") == "reaped" and r.get("dead_owner") == owner]
    out = {
        "round": k,
        "held": len(held),
        "held_submit": len(submit_ids),
        "held_poll": len(poll_ids),
        "released": released,
        "done": done,
        "failed": int(failed or 0),
        "reaped_leases": sum(int(r.get("leases_released", 0)) for r in reaped),
    }
    print(
        f"[takeover] round {k}: victim held {len(held)} lease(s) ({len(submit_ids)} submit, {len(poll_ids)} poll); "
        f"released after {released if released is None else round(released, 2)} s, "
        f"its rows done after {done if done is None else round(done, 2)} s",
        flush=True,
    )
    return out


def takeover(bench: database.Bench, emu: harness.ExternalEmulator, kills: int, report: reporting.Report) -> dict:
    url, db = bench.database("bench_takeover")
    conn = bench.connect("bench_takeover")
    seed.goods(conn)
    seed.analyze(conn)
    job_overrides = {
        "submit_refund": {"batch_size": SUBMIT_BATCH, "concurrency": CONCURRENCY, "lease_seconds": LEASE_SECONDS},
        "poll_refund": {"concurrency": CONCURRENCY, "lease_seconds": LEASE_SECONDS},
    }
    config = harness.daemon_config(url, emu, jobs=harness.fast_jobs(**job_overrides))
    survivor = DaemonProcess(WORKDIR, config, emu.env(), name="survivor").start()
    rounds = []
    try:
        survivor.wait_started(60)
        for k in range(1, kills + 1):
            lo = (k - 1) * REFUNDS_PER_ROUND + 1
            rounds.append(one_kill(conn, db, emu, config, survivor, k, lo, lo + REFUNDS_PER_ROUND - 1))
    finally:
        survivor.close()
        conn.close()
    snap = emu.emulator.snapshot()
    created_twice = sum(1 for n in snap["refunds_created"].values() if n != 1)
    raced = sum(1 for n in snap["max_in_flight"].values() if n > 1)

    released = [r["released"] for r in rounds if r["released"] is not None]
    done = [r["done"] for r in rounds if r["done"] is not None]
    report.table(
        f"Takeover after kill -9, {kills} kills: victim and survivor daemons, {CONCURRENCY} calls at once of "
        f"{LATENCY_SECONDS[0]}-{LATENCY_SECONDS[1]} s each, lease_seconds {LEASE_SECONDS}",
        [
            "kill",
            "leases held (submit + poll)",
            "kill -> victim's leases released (s)",
            "kill -> its rows done (s)",
            "leases the survivor's reaper released",
            "its rows failed",
        ],
        [
            [
                r["round"],
                f"{r['held']} ({r['held_submit']} + {r['held_poll']})",
                r["released"],
                r["done"],
                r["reaped_leases"],
                r["failed"],
            ]
            for r in rounds
        ],
    )
    fig = {
        "released_median": reporting.median(released) if released else None,
        "released_max": max(released) if len(released) == len(rounds) else None,
        "done_median": reporting.median(done) if done else None,
        "done_max": max(done) if len(done) == len(rounds) else None,
    }
    report.table(
        f"Takeover over {kills} kills",
        ["figure", "median", "max", "x lease_seconds (median / max)", "x takeover_seconds (median / max)"],
        [
            [
                "kill -> no row leased by the victim (s)",
                fig["released_median"],
                fig["released_max"],
                f"{reporting.ratio(fig['released_median'], LEASE_SECONDS) or 0:.3f} / {reporting.ratio(fig['released_max'], LEASE_SECONDS) or 0:.3f}",
                f"{reporting.ratio(fig['released_median'], DEFAULT_TAKEOVER_SECONDS) or 0:.2f} / "
                f"{reporting.ratio(fig['released_max'], DEFAULT_TAKEOVER_SECONDS) or 0:.2f}",
            ],
            [
                "kill -> every row it held done (s)",
                fig["done_median"],
                fig["done_max"],
                f"{reporting.ratio(fig['done_median'], LEASE_SECONDS) or 0:.3f} / {reporting.ratio(fig['done_max'], LEASE_SECONDS) or 0:.3f}",
                f"{reporting.ratio(fig['done_median'], DEFAULT_TAKEOVER_SECONDS) or 0:.2f} / "
                f"{reporting.ratio(fig['done_max'], DEFAULT_TAKEOVER_SECONDS) or 0:.2f}",
            ],
        ],
    )
    if fig["released_max"] is not None:
        report.target(
            "takeover after kill -9",
            f"max {fig['released_max']:.1f} s, median {fig['released_median']:.1f} s over {kills} kills",
            f"< {TAKEOVER_BOUND_SECONDS} s (the acceptance test's bound)",
            fig["released_max"] < TAKEOVER_BOUND_SECONDS,
        )
    else:
        report.target(
            "takeover after kill -9",
            f"{len(rounds) - len(released)} of {kills} kills not taken over within lease_seconds + 30 s",
            f"< {TAKEOVER_BOUND_SECONDS} s",
            False,
        )
    report.note(
        f"takeover: refund numbers created more than once at WeChat: {created_twice}; numbers with two calls in "
        f"flight at once: {raced} (the emulator's counters over all {kills} kills). Each round seeds "
        f"{REFUNDS_PER_ROUND} refunds ready for submit_refund after the victim has started; the victim is killed "
        f"as soon as it holds a submit lease; the kill instant is taken just before SIGKILL is sent; the table "
        f"is polled every {POLL_SECONDS * 1000:.0f} ms. Jobs: the acceptance tests' fast_jobs (interval 0.3 s), "
        f"submit_refund batch {SUBMIT_BATCH}; registry defaults (heartbeat 1 s, takeover_seconds "
        f"{DEFAULT_TAKEOVER_SECONDS:.0f} s)."
    )
    fig.update(created_twice=created_twice, raced=raced, kills=kills)
    return fig


# --- 2. a checkout on a goods row restore_stock is restoring -------------------------------------


def timetable(seconds: float, gap: float, watch=None, drain: tuple | None = None):
    """Due instants (perf_counter), one every ``gap`` s for ``seconds``, each yielded once it is due.

    With ``drain`` ((lo, hi) ids of the orders the daemon restores), stops early as soon as
    none of them is ready any more (checked every BUSY_CHECK_SECONDS on ``watch``), and then
    sets ``state["drained"]``.
    """
    started = time.perf_counter()
    next_check = started + BUSY_CHECK_SECONDS
    state = {"drained": False, "started": started}
    yield state
    for k in range(int(seconds / gap)):
        due = started + k * gap
        now = time.perf_counter()
        if drain and now >= next_check:
            next_check = now + BUSY_CHECK_SECONDS
            if not database.scalar(watch, READY_SQL, drain):
                state["drained"] = True
                return
            now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        yield due


def checkout_loop(shop, goods_id: int, seconds: float, gap: float, watch, drain: tuple | None) -> dict:
    """The shop's checkout in a loop on one connection: each statement timed with perf_counter.

    One checkout due every ``gap`` s; one due while the previous still waits goes right after it.
    """
    times = timetable(seconds, gap, watch, drain)
    state = next(times)
    statement: list[float] = []
    with shop.cursor() as cur:
        for _due in times:
            t0 = time.perf_counter()
            cur.execute(CHECKOUT_SQL, (goods_id,))
            statement.append(time.perf_counter() - t0)
    return {
        "statement": statement,
        "from_due": None,
        "seconds": time.perf_counter() - state["started"],
        "drained": state["drained"],
    }


def checkout_shoppers(shoppers: list, goods_id: int, seconds: float, gap: float, watch, drain: tuple | None) -> dict:
    """The same checkouts, each on the next free one of many connections (shoppers arrive whatever the others wait).

    Per checkout: the statement's own time, and the time from when it was due until it returned
    (including any wait for a free connection: there are enough that there should be none).
    """
    jobs_q: queue.SimpleQueue = queue.SimpleQueue()
    results: list[tuple[float, float]] = []

    def worker(conn) -> None:
        with conn.cursor() as cur:
            while (due := jobs_q.get()) is not None:
                t0 = time.perf_counter()
                cur.execute(CHECKOUT_SQL, (goods_id,))
                t1 = time.perf_counter()
                results.append((t1 - t0, t1 - due))  # list.append is atomic

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in shoppers]
    for t in threads:
        t.start()
    times = timetable(seconds, gap, watch, drain)
    state = next(times)
    for due in times:
        jobs_q.put(due)
    for _ in threads:
        jobs_q.put(None)
    for t in threads:
        t.join(60)
    return {
        "statement": [r[0] for r in results],
        "from_due": [r[1] for r in results],
        "seconds": time.perf_counter() - state["started"],
        "drained": state["drained"],
    }


def restored(conn, lo: int, hi: int) -> int:
    return database.scalar(
        conn, "SELECT COUNT(*) FROM goods_order2 WHERE stock_scanned = 1 AND id BETWEEN %s AND %s", (lo, hi)
    )


def ms(values: list[float] | None, p: float | None = None) -> float | None:
    if not values:
        return None
    return (max(values) if p is None else reporting.percentile(values, p)) * 1e3


def checkout(
    bench: database.Bench,
    emu: harness.ExternalEmulator,
    n_orders: int,
    seconds: float,
    gap: float,
    n_shoppers: int,
    report: reporting.Report,
) -> dict:
    url, db = bench.database("bench_checkout")
    conn = bench.connect("bench_checkout")  # seeding and watching
    shop = bench.connect("bench_checkout")  # the checkout loop's own connection
    shoppers = [bench.connect("bench_checkout") for _ in range(n_shoppers)]
    seed.goods(conn, COLD_GOODS)
    seed.analyze(conn)
    hot_share = f"IF(seq % 2 = 0, {HOT_GOODS}, 2 + seq % {seed.N_GOODS - 1})"  # half hot, the rest over 2..N_GOODS
    raw = harness.daemon_config(
        url, emu, jobs=configs.jobs(enabled=["restore_stock"], restore_stock={"batch_size": RESTORE_BATCH})
    )
    phases: dict[str, dict] = {}
    next_id = 1
    daemon = DaemonProcess(WORKDIR, raw, emu.env(), name="checkout-daemon").start()
    try:
        daemon.wait_started(60)
        follower = LogFollower(daemon)

        def phase(key: str, goods_id: int, busy: bool, many: bool = False) -> None:
            nonlocal next_id
            database.wait_for_purge(conn)
            drain = before = None
            if busy:
                lo, hi = next_id, next_id + n_orders - 1
                next_id = hi + 1
                seed.orders(conn, lo, hi, "cancelled_unpaid", goods_sql=hot_share)
                database.sql(conn, "ANALYZE TABLE goods_order2")
                wait_until(
                    lambda: restored(conn, lo, hi),
                    60,
                    "restore_stock to start",
                    until=lambda n: n >= RESTORE_BATCH,
                    interval=0.01,
                    daemons=[daemon],
                )
                drain = (lo, hi)
                before = restored(conn, lo, hi)
            follower.new_records()  # what the daemon logged before this phase
            if many:
                got = checkout_shoppers(shoppers, goods_id, seconds, gap, conn, drain)
            else:
                got = checkout_loop(shop, goods_id, seconds, gap, conn, drain)
            batches = [
                r for r in follower.new_records() if r.get("action") == "batch" and r.get("stage") == "restore_stock"
            ]
            st, due = got["statement"], got["from_due"]
            row = {
                "goods": goods_id,
                "busy": busy,
                "many": many,
                "n": len(st),
                "seconds": got["seconds"],
                "drained_early": got["drained"],
                "p50": ms(st, 50),
                "p99": ms(st, 99),
                "max": ms(st),
                "blocked": sum(1 for w in st if w * 1e3 > BLOCKED_MS),
                "due_p50": ms(due, 50),
                "due_p99": ms(due, 99),
                "due_max": ms(due),
                "batches": len(batches),
                "later": sum(int(r.get("later", 0)) for r in batches),
                "restored_per_s": None,
            }
            if busy:
                row["restored_per_s"] = (restored(conn, *drain) - before) / got["seconds"]
                wait_until(
                    lambda: database.scalar(conn, PENDING_SQL, drain),
                    600,
                    "the drain to finish",
                    until=lambda x: not x,
                    interval=0.2,
                    daemons=[daemon],
                )
            phases[key] = row
            extra = f"; from due p50 {row['due_p50']:.2f} ms, p99 {row['due_p99']:.2f} ms" if many else ""
            print(
                f"[checkout] {key}: {row['n']:,} checkouts in {row['seconds']:.1f} s; statement p50 {row['p50']:.2f} ms, "
                f"p99 {row['p99']:.2f} ms, max {row['max']:.1f} ms{extra}; daemon batches {row['batches']}, "
                f"rows answered Later {row['later']}",
                flush=True,
            )

        phase("hot idle", HOT_GOODS, busy=False)
        phase("hot busy", HOT_GOODS, busy=True)
        phase("cold busy", COLD_GOODS, busy=True)
        phase("cold idle", COLD_GOODS, busy=False)
        if n_shoppers:
            phase("hot idle, shoppers", HOT_GOODS, busy=False, many=True)
            phase("hot busy, shoppers", HOT_GOODS, busy=True, many=True)
        done_ok = database.scalar(
            conn, "SELECT COUNT(*) FROM goods_order2 WHERE stock_scanned = 1 AND stock_success = 1"
        )
        total = database.scalar(conn, "SELECT COUNT(*) FROM goods_order2")
    finally:
        daemon.close()
        for c in [shop, conn, *shoppers]:
            c.close()

    def label(p: dict) -> list:
        return [
            f"goods {p['goods']} ({'hot' if p['goods'] == HOT_GOODS else 'cold'})",
            "restoring" if p["busy"] else "idle",
        ]

    def timings(p: dict, *more: str) -> list:
        """A phase's checkouts, seconds, p50, p99 and max ms and those over BLOCKED_MS; then ``more`` of its figures."""
        return [p[k] for k in ("n", "seconds", "p50", "p99", "max", "blocked", *more)]

    loop = [phases[k] for k in ("hot idle", "hot busy", "cold busy", "cold idle")]
    report.table(
        f"Checkout `{CHECKOUT_SQL.replace('%s', '?')}` (autocommit) in a loop on one connection, one due every "
        f"{gap * 1000:g} ms for {seconds:g} s; busy: the daemon's restore_stock (batch {RESTORE_BATCH}) restoring "
        f"{n_orders:,} cancelled unpaid orders, half of them for the hot goods",
        [
            "checkout on",
            "daemon",
            "checkouts",
            "seconds",
            "p50 ms",
            "p99 ms",
            "max ms",
            f"checkouts > {BLOCKED_MS:g} ms",
            "daemon batches",
            "rows answered Later (goods busy)",
            "rows restored/s",
        ],
        [label(p) + timings(p, "batches", "later", "restored_per_s") for p in loop],
    )
    hi, hb, cb, ci = loop
    fig = {
        "phases": phases,
        "hot_ratio": reporting.ratio(hb["p99"], hi["p99"]),
        "cold_ratio": reporting.ratio(cb["p99"], ci["p99"]),
        "cold_vs_hot_idle": reporting.ratio(cb["p99"], hi["p99"]),
    }
    report.table(
        "Checkout p99 while restore_stock is busy vs idle (one connection, same run)",
        ["goods row", "p99 idle ms", "p99 busy ms", "p99 busy / idle", "max idle ms", "max busy ms"],
        [
            ["hot (half the pending orders)", hi["p99"], hb["p99"], fig["hot_ratio"], hi["max"], hb["max"]],
            ["cold (no pending order)", ci["p99"], cb["p99"], fig["cold_ratio"], ci["max"], cb["max"]],
        ],
    )
    if n_shoppers:
        si, sb = phases["hot idle, shoppers"], phases["hot busy, shoppers"]
        fig.update(
            shoppers=n_shoppers,
            shop_ratio=reporting.ratio(sb["p99"], si["p99"]),
            shop_due_ratio=reporting.ratio(sb["due_p99"], si["due_p99"]),
        )
        report.table(
            f"The same checkouts on the hot goods, each on the next free of {n_shoppers} connections (shoppers do not "
            f"wait for each other's round trips)",
            [
                "daemon",
                "checkouts",
                "seconds",
                "statement p50 ms",
                "statement p99 ms",
                "statement max ms",
                f"statements > {BLOCKED_MS:g} ms",
                "from due p50 ms",
                "from due p99 ms",
                "from due max ms",
                "rows answered Later (goods busy)",
                "rows restored/s",
            ],
            [[label(p)[1], *timings(p, "due_p50", "due_p99", "due_max", "later", "restored_per_s")] for p in (si, sb)]
            + [
                [
                    "busy / idle (p99)",
                    None,
                    None,
                    None,
                    fig["shop_ratio"],
                    None,
                    None,
                    None,
                    fig["shop_due_ratio"],
                    None,
                    None,
                    None,
                ]
            ],
        )
    early = [k for k, p in phases.items() if p["drained_early"]]
    if early:
        report.note(
            f"checkout: the daemon ran out of ready rows before the {seconds:g} s were up in: {', '.join(early)} "
            f"(measured until then)"
        )
    if done_ok != total:
        report.note(f"checkout: {done_ok:,} of {total:,} orders ended restored (1/1)")
    report.note(
        f"checkout: one autocommit UPDATE per checkout, one due every {gap * 1000:g} ms on a fixed timetable, each timed "
        f"with time.perf_counter around execute. In the loop on one connection a checkout due while the one before it "
        f"waits goes right after it, so after each wait the loop's next checkouts run back to back on a just-freed row "
        f"and its p50 stays at an idle checkout's time even if the daemon holds the row most of the time (its p99 and "
        f"max do show the waits). The shoppers' 'from due' (from the instant the checkout was due until it returned, "
        f"each on its own connection) is what a checkout arriving at a random moment waits. Busy phases start once the daemon's first batch of the drain "
        f"committed and stop after {seconds:g} s or as soon as no row is ready any more (checked every "
        f"{BUSY_CHECK_SECONDS * 1000:.0f} ms; rows answered Later wait for the next interval, so only full batches are "
        f"measured). The daemon: `cancel-scanner run`, only restore_stock, jobs.yaml's interval (2 s; a full batch runs "
        f"again at once). Phases in this order: hot idle, hot busy, cold busy, cold idle"
        f"{', shoppers hot idle, shoppers hot busy' if n_shoppers else ''}; InnoDB purge waited out before each."
    )
    report.note(
        "checkout: why the hot row still waits: restore_stock takes its goods rows last (FOR UPDATE SKIP LOCKED in the "
        "batch's final statement, after its oplog and flag writes), so the daemon never waits for a checkout (a goods row a "
        "checkout holds is skipped, its orders answered Later) and a checkout waits at most for the goods UPDATE and the "
        "commit of one batch."
    )
    return fig


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=None, help="kill -9 rounds (default 10; --quick 3)")
    p.add_argument(
        "--orders",
        type=int,
        default=None,
        help="cancelled unpaid orders per busy phase (default 200,000; --quick 80,000): enough for the daemon "
        "(~15,000 rows/s here) to stay busy for the whole loop",
    )
    p.add_argument("--seconds", type=float, default=None, help="checkout loop per phase (default 10; --quick 4)")
    p.add_argument("--gap-ms", type=float, default=2.0, help="one checkout due every this many ms (default 2)")
    p.add_argument(
        "--shoppers",
        type=int,
        default=32,
        help="connections for the open-loop checkout phases on the hot goods (default 32; 0: skip them)",
    )
    p.add_argument("--only", choices=("takeover", "checkout"), default=None, help="run one of the two measurements")
    args = reporting.arguments(p)
    harness.quiet_emulator_logs()
    kills = reporting.size(args, "kills", quick=3, full=10)
    n_orders = reporting.size(args, "orders", quick=80_000, full=200_000)
    seconds = reporting.size(args, "seconds", quick=4.0, full=10.0)
    gap = args.gap_ms / 1000
    report = reporting.Report(
        f"Takeover after kill -9 ({kills} kills); a checkout on a goods row restore_stock is restoring"
    )
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    key_dir = Path(tempfile.mkdtemp(prefix="bench-takeover-keys-"))
    t_fig = c_fig = None
    try:
        with database.Bench(report=report) as bench:
            emu = harness.ExternalEmulator.start(key_dir, latency=LATENCY_SECONDS, success_delay=0.2)
            try:
                if args.only in (None, "takeover"):
                    t_fig = takeover(bench, emu, kills, report)
                if args.only in (None, "checkout"):
                    c_fig = checkout(bench, emu, n_orders, seconds, gap, args.shoppers, report)
            finally:
                emu.stop()
    finally:
        shutil.rmtree(key_dir, ignore_errors=True)

    def pair(a, b, digits: int = 2) -> str:
        return " / ".join("-" if x is None else f"{x:.{digits}f}" for x in (a, b))

    rows = []
    if t_fig:
        rows += [
            [
                f"takeover after kill -9: kill -> no row leased by the victim, median / max over {t_fig['kills']} kills (s)",
                pair(t_fig["released_median"], t_fig["released_max"]),
            ],
            [
                f"  the same / lease_seconds ({LEASE_SECONDS} s)",
                pair(
                    reporting.ratio(t_fig["released_median"], LEASE_SECONDS),
                    reporting.ratio(t_fig["released_max"], LEASE_SECONDS),
                    3,
                ),
            ],
            ["kill -> every row the victim held done, median / max (s)", pair(t_fig["done_median"], t_fig["done_max"])],
            [
                "refunds created twice / numbers with two calls in flight at once",
                f"{t_fig['created_twice']} / {t_fig['raced']}",
            ],
        ]
    if c_fig:
        ph = c_fig["phases"]
        names = {
            "hot idle": "hot goods, daemon idle",
            "hot busy": "hot goods, daemon restoring it",
            "cold busy": "cold goods, daemon restoring others",
            "cold idle": "cold goods, daemon idle",
        }
        for key, name in names.items():
            p_ = ph[key]
            rows.append(
                [f"checkout loop, {name}: p50 / p99 / max (ms)", f"{p_['p50']:.2f} / {p_['p99']:.2f} / {p_['max']:.1f}"]
            )
        rows += [
            ["checkout loop p99 busy / idle, hot goods", f"{c_fig['hot_ratio']:.1f}"],
            ["checkout loop p99 busy / idle, cold goods", f"{c_fig['cold_ratio']:.1f}"],
        ]
        if "shoppers" in c_fig:
            for key, name in (("hot idle, shoppers", "daemon idle"), ("hot busy, shoppers", "daemon restoring it")):
                p_ = ph[key]
                rows.append(
                    [
                        f"{c_fig['shoppers']} shoppers on the hot goods, {name}: from due p50 / p99 / max (ms)",
                        f"{p_['due_p50']:.2f} / {p_['due_p99']:.2f} / {p_['due_max']:.1f}",
                    ]
                )
            rows.append(
                [
                    f"{c_fig['shoppers']} shoppers, hot goods: p99 busy / idle, statement / from due",
                    pair(c_fig["shop_ratio"], c_fig["shop_due_ratio"], 1),
                ]
            )
    report.table("Summary", ["figure", "value"], rows)
    return report.save(args)


if __name__ == "__main__":
    sys.exit(main())
