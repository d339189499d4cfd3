"""Reconciliation of one day's ALL bill of 100,000 rows against a refund_order of 1,050,000 refunds.

One database: ``--rows`` / 2 finished refunds (every flag 1/1, wx_status SUCCESS, out_refund_no
CSR<id>-1) submitted through one Beijing day (yesterday), their orders in goods_order2 cancelled
and refunded, and ``--older`` finished refunds (and their orders) of the 89 days before it;
statistics fresh. The day's ALL bill is made by the emulator's own bill code
(gateway.emulator.bills.BillDesk: header, backticks, BOM, yuan, summary) from one payment and one
refund per refunded order of the day: ``--rows`` / 2 payment rows + ``--rows`` / 2 refund rows =
``--rows`` detail rows. Gzipped and hashed (SHA1 of the plain bill) as the emulator serves it.

Measured, median of ``--reps`` runs on the same database (each reconcile_day replaces the day's rows):

(a) reading the bill alone: gunzip (done by the gateway's download), check_sha1, parse_bill;
(b) reconcile_day with a fetch answering the parsed Bill for the day and NoBill for its
    neighbours: compare (our refunds by out_refund_no, the day's submitted refunds, cancelled
    orders among the paid and their refunds) and record (reconcile_diff, reconcile_run);
(c) as (b) on a bill where ``--diff-percent`` of its rows (refund rows: the only amounts compare
    reads) are one fen off: the cost of writing differences.

Before the timed runs, one run of (b) and one of (c) with a before/after_cursor_execute listener:
each statement kind EXPLAINed on the seeded tables the first time it is sent (verdict FULL SCAN
for a table read whole), and the time spent in statements of each kind. After the timed runs the
older refunds are copied into refund_order_archive (as prune leaves them) and one more
instrumented run EXPLAINs the archive's lookup on a full archive.

Targets: parse_bill as its docstring says, about a second per 100,000 rows; no statement reads a
table whole (the archive judged full).

    .venv/bin/python bench/reconcile.py [--quick] [--rows 100000] [--older 1000000] [--reps 3] [--diff-percent 1]
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event

from bench import database, reporting, seed
from cancel_scanner.gateway.emulator.bills import BillDesk, day_start
from cancel_scanner.gateway.emulator.records import STATUS_SUCCESS, Payment, Refund
from cancel_scanner.operations.bill import NoBill, check_sha1, parse_bill
from cancel_scanner.operations.reconcile import BEIJING, EDGE, day_bounds, reconcile_day

# The day's refunds are submitted over [day start, day end - EDGE): all of them are the day's for compare.
DAY_SPAN_SECONDS = 86_400 - int(EDGE.total_seconds()) - 1
OLDER_DAYS = 89  # the older refunds: the 89 days before the day before the bill's
PARSE_TARGET_ROWS_PER_SECOND = 100_000.0  # parse_bill's docstring: "about a second for a hundred thousand rows"
FULL_SCANS = ("ALL", "index")
GZIP_LEVEL = 6  # the emulator's download


# --- the database --------------------------------------------------------------------------------


def seed_refunds(conn, day_refunds: int, older: int, bill_date: date) -> None:
    """Orders and finished refunds 1..day_refunds submitted through ``bill_date``, then ``older`` of earlier days."""
    total = day_refunds + older
    seed.orders(conn, 1, total, "finished")
    seed.refunds(conn, 1, total, "finished")
    start, _end = day_bounds(bill_date)
    start_sql = f"TIMESTAMP'{start:%Y-%m-%d %H:%M:%S}'"
    day = f"{start_sql} + INTERVAL FLOOR((id - 1) * {DAY_SPAN_SECONDS} / {day_refunds}) SECOND"
    before = f"{start_sql} - INTERVAL 1 DAY - INTERVAL ((id * 7919) % {OLDER_DAYS * 86_400}) SECOND"
    for lo in range(1, total + 1, seed.SEED_CHUNK_ROWS):
        hi = min(total, lo + seed.SEED_CHUNK_ROWS - 1)
        submitted = f"IF(id <= {day_refunds}, {day}, {before})"
        database.sql(
            conn,
            f"UPDATE refund_order SET submitted_at = {submitted},"
            f" success_time = {submitted} + INTERVAL 1 MINUTE WHERE id BETWEEN {lo} AND {hi}",
        )
    seed.analyze(conn)
    for table in ("refund_order_archive", "reconcile_diff", "reconcile_run"):
        database.sql(conn, f"ANALYZE TABLE {table}")


def amount(i: int) -> int:
    """seed.AMOUNT_SQL in Python: the fen of order i."""
    return 100 + (i * 7919) % 99900


# --- the bill -----------------------------------------------------------------------------------


class BillMaker(BillDesk):
    """The emulator's bill code over a ledger given whole: BillDesk with the attributes it says the
    Emulator provides, so the bill is byte for byte the one the emulator would serve."""

    def __init__(self, payments: list[Payment], refunds: list[Refund]) -> None:
        self.keys = SimpleNamespace(appid="wxd930ea5d5a258f4f", mchid="1230000109")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._clock = time.time
        self._payments = {p.out_trade_no: p for p in payments}
        self._refunds = {r.out_refund_no: r for r in refunds}
        self._init_bills()

    def _advance(self, refund: Refund, now: float) -> bool:
        return False  # every refund is final (SUCCESS) already


def make_bill(bill_date: date, day_refunds: int, off_by_a_fen: set[int]) -> bytes:
    """The ALL bill: each refunded order's payment and refund of the day; refunds in ``off_by_a_fen`` one fen more."""
    start = day_start(bill_date)
    payments, refunds = [], []
    for i in range(1, day_refunds + 1):
        offset = (i - 1) * DAY_SPAN_SECONDS // day_refunds  # as seed_refunds' submitted_at
        trade, transaction, fen = f"SO{i:012d}", f"4200{i:024d}", amount(i)
        payments.append(Payment(trade, fen, transaction, success_at=start + offset // 2))
        refunds.append(
            Refund(
                f"50{i:030d}",
                f"CSR{i}-1",
                trade,
                transaction,
                fen + (i in off_by_a_fen),
                fen,
                None,
                created_at=start + offset,
                status=STATUS_SUCCESS,
                success_at=start + offset + 60,
            )
        )
    data = BillMaker(payments, refunds).bill_bytes(bill_date, "ALL")
    assert data is not None
    return data


def read_bill(packed: bytes, sha1: str, bill_date: date):
    """What fetch_bill does with the download: gunzip (the gateway), check_sha1, parse_bill."""
    data = gzip.decompress(packed)
    check_sha1(data, sha1)
    return parse_bill(data, bill_date)


# --- what reconcile_day sends --------------------------------------------------------------------


def kind_of(statement: str) -> str | None:
    """'SELECT refund_order by out_refund_no': verb, table, first column filtered; None for no table."""
    words = statement.split()
    verb = words[0].upper()
    table = re.search(r"\b(?:FROM|INTO|UPDATE)\s+`?(\w+)", statement)
    if table is None:
        return None
    where = re.search(r"\bWHERE\s+\(?`?(?:\w+`?\.)?`?(\w+)", statement)
    distinct = " DISTINCT" if verb == "SELECT" and words[1].upper() == "DISTINCT" else ""
    return f"{verb}{distinct} {table.group(1)}" + (f" by {where.group(1)}" if where else "")


class Capture:
    """EXPLAIN of each statement kind the first time it is sent (on its own connection); seconds per kind."""

    def __init__(self, engine, conn) -> None:
        self.engine, self.conn = engine, conn
        self.plans: dict[str, list[dict]] = {}
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def __enter__(self) -> Capture:
        event.listen(self.engine, "before_cursor_execute", self.before)
        event.listen(self.engine, "after_cursor_execute", self.after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self.before)
        event.remove(self.engine, "after_cursor_execute", self.after)

    def reset_timing(self) -> None:
        self.seconds, self.count = {}, {}

    def before(self, _c, _cursor, statement, parameters, context, many) -> None:
        kind = kind_of(statement)
        if kind is not None and kind not in self.plans:
            with self.conn.cursor() as cur:
                cur.execute("EXPLAIN " + statement, parameters[0] if many else parameters)
                names = [d[0] for d in cur.description]
                self.plans[kind] = [dict(zip(names, row)) for row in cur.fetchall()]
        context._bench_kind, context._bench_started = kind or statement.split()[0].upper(), time.perf_counter()

    def after(self, _c, _cursor, _statement, _parameters, context, _many) -> None:
        kind = context._bench_kind
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - context._bench_started
        self.count[kind] = self.count.get(kind, 0) + 1


def explain_row(archive: str, kind: str, row: dict) -> list:
    """One row of the EXPLAIN table: the archive's size, the statement's kind, what EXPLAIN says, the verdict."""
    return [archive, kind, row["table"], row["type"], row["key"], row["rows"], row["Extra"] or "", verdict(kind, row)]


def verdict(kind: str, row: dict) -> str:
    """FULL SCAN for a table read whole; an IN list of 1,000 values or more is a temporary table of its own
    (MariaDB's in_predicate_conversion_threshold), read whole by design, then each value by an index."""
    name = str(row["table"] or "")
    if not name or name.startswith("<"):
        return "the value list"
    if kind.startswith("INSERT") and row["rows"] is None:
        return "no read (VALUES)"
    return "FULL SCAN" if row["type"] in FULL_SCANS else "index"


def fill_archive(conn, lo: int, hi: int) -> None:
    """Refunds lo..hi copied into refund_order_archive, as prune leaves them there; statistics fresh."""
    columns = ", ".join(
        name
        for (name,) in database.sql(
            conn,
            "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE()"
            " AND table_name = 'refund_order_archive' AND column_name <> 'archived_at' ORDER BY ordinal_position",
        )
    )
    for a in range(lo, hi + 1, seed.SEED_CHUNK_ROWS):
        b = min(hi, a + seed.SEED_CHUNK_ROWS - 1)
        database.sql(
            conn,
            f"INSERT INTO refund_order_archive ({columns}) SELECT {columns} FROM refund_order"
            f" WHERE id BETWEEN {a} AND {b}",
        )
    database.sql(conn, "ANALYZE TABLE refund_order_archive")


# --- the runs -----------------------------------------------------------------------------------


def timed(fn, reps: int) -> tuple[list[float], object]:
    took, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        took.append(time.perf_counter() - started)
    return took, result


def check(result, state: str, rows: int, diffs: int) -> None:
    if result.state != state or result.bill_rows != rows or len(result.diffs) != diffs:
        raise RuntimeError(
            f"reconcile_day: {result.state}, {result.bill_rows} bill rows, {result.counts}; expected"
            f" {state}, {rows} rows, {diffs} difference(s)"
        )


def main() -> int:
    p = reporting.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="the bill's detail rows, half payments, half refunds (default 100,000; --quick 10,000)",
    )
    p.add_argument(
        "--older", type=int, default=None, help="finished refunds of earlier days (default 1,000,000; --quick 100,000)"
    )
    p.add_argument("--reps", type=int, default=3, help="runs per measurement, median reported (default 3)")
    p.add_argument("--diff-percent", type=float, default=1.0, help="the bill's rows one fen off in (c) (default 1)")
    args = reporting.arguments(p)  # parsed, the product's logging quieted
    rows = reporting.size(args, "rows", quick=10_000, full=100_000)
    older = args.older if args.older is not None else (100_000 if args.quick else 1_000_000)
    day_refunds = rows // 2
    rows = 2 * day_refunds
    planted = max(1, round(rows * args.diff_percent / 100))
    if planted > day_refunds:
        raise SystemExit(f"--diff-percent: {planted} differences, but the bill has {day_refunds} refund rows")
    bill_date = datetime.now(BEIJING).date() - timedelta(days=1)
    report = reporting.Report(
        f"reconcile: one day's ALL bill of {rows:,} rows ({day_refunds:,} refunds + {day_refunds:,}"
        f" payments) against {day_refunds + older:,} finished refunds"
    )

    print(f"making the bills of {bill_date}", flush=True)
    stride = day_refunds // planted
    off = {stride * k for k in range(1, planted + 1)}
    bills = {}
    for label, off_by_a_fen in (("clean", set()), ("differs", off)):
        plain = make_bill(bill_date, day_refunds, off_by_a_fen)
        bills[label] = (plain, gzip.compress(plain, compresslevel=GZIP_LEVEL, mtime=0), hashlib.sha1(plain).hexdigest())

    with database.Bench(report=report) as bench:
        db = bench.seeded(
            "bench_reconcile",
            lambda conn: seed_refunds(conn, day_refunds, older, bill_date),
            f"{day_refunds:,} refunds of {bill_date} and {older:,} older",
        )
        engine, conn = db.engine, db.conn
        database.wait_for_purge(conn)

        # (a) reading the bill
        plain, packed, sha1 = bills["clean"]
        parsed = {}
        gunzip_t, _ = timed(lambda: gzip.decompress(packed), args.reps)
        sha_t, _ = timed(lambda: check_sha1(plain, sha1), args.reps)
        parse_t, parsed["clean"] = timed(lambda: parse_bill(plain, bill_date), args.reps)
        all_t, _ = timed(lambda: read_bill(packed, sha1, bill_date), args.reps)
        plain_d, packed_d, sha1_d = bills["differs"]
        parsed["differs"] = read_bill(packed_d, sha1_d, bill_date)
        for bill in parsed.values():
            if bill.rows != rows or len(bill.refunds) != day_refunds:
                raise RuntimeError(f"the bill parsed to {bill.rows} rows, {len(bill.refunds)} refunds")

        def run(label: str):
            bill = parsed[label]
            now = datetime.now(UTC).replace(tzinfo=None)
            return reconcile_day(engine, lambda d: bill if d == bill_date else NoBill(d), bill_date, now=now)

        # the instrumented runs: EXPLAIN, seconds per statement kind (and the buffer pool warmed)
        statement_rows = []
        with Capture(engine, conn) as capture:
            for label, state, diffs in (("clean", "CLEAN", 0), ("differs", "DIFFERS", planted)):
                capture.reset_timing()
                took, result = timed(lambda: run(label), 1)  # noqa: B023 - called in this iteration
                check(result, state, rows, diffs)
                in_db = sum(capture.seconds.values())
                for kind in sorted(capture.seconds, key=capture.seconds.get, reverse=True):
                    statement_rows.append(
                        [
                            label,
                            kind,
                            capture.count[kind],
                            capture.seconds[kind],
                            f"{100 * capture.seconds[kind] / took[0]:.0f}%",
                        ]
                    )
                statement_rows.append(
                    [
                        label,
                        "all statements / the run",
                        sum(capture.count.values()),
                        in_db,
                        f"{100 * in_db / took[0]:.0f}% of {took[0]:.2f} s",
                    ]
                )
        explain_rows, scans, empty_scans = [], [], []
        for kind, plan in capture.plans.items():
            for row in plan:
                if verdict(kind, row) == "FULL SCAN":
                    # the empty archive: a full scan of nothing, judged again below on a full archive
                    (empty_scans if "archive" in str(row["table"]) else scans).append(f"{kind} (type {row['type']})")
                explain_rows.append(explain_row("empty", kind, row))

        # (b), (c): the timed runs
        clean_t, result = timed(lambda: run("clean"), args.reps)
        check(result, "CLEAN", rows, 0)
        differs_t, result = timed(lambda: run("differs"), args.reps)
        check(result, "DIFFERS", rows, planted)
        recorded = database.scalar(conn, "SELECT COUNT(*) FROM reconcile_diff WHERE bill_date = %s", (bill_date,))
        if recorded != planted or result.counts != {"AMOUNT_DIFFERS": planted}:
            raise RuntimeError(
                f"(c): {recorded} rows in reconcile_diff, counts {result.counts}; expected {planted} AMOUNT_DIFFERS"
            )

        # the archive as prune leaves it: does its lookup still use its index once it holds rows?
        print(f"copying the {older:,} older refunds into refund_order_archive", flush=True)
        fill_archive(conn, day_refunds + 1, day_refunds + older)
        with Capture(engine, conn) as capture:
            took, result = timed(lambda: run("clean"), 1)
            check(result, "CLEAN", rows, 0)
        for kind, plan in capture.plans.items():
            if "archive" not in kind:
                continue
            statement_rows.append(
                [
                    f"clean, archive of {older:,}",
                    kind,
                    capture.count[kind],
                    capture.seconds[kind],
                    f"{100 * capture.seconds[kind] / took[0]:.0f}% of {took[0]:.2f} s",
                ]
            )
            for row in plan:
                if verdict(kind, row) == "FULL SCAN":
                    scans.append(f"{kind} ({row['table']}, type {row['type']}, archive of {older:,})")
                explain_rows.append(explain_row(f"{older:,}", kind, row))
        conn.close()

    med = reporting.median
    a, b, c = med(all_t), med(clean_t), med(differs_t)
    report.table(
        "the bill (the emulator's ALL bill: detail header, backticked values, BOM, yuan, summary)",
        ["bill", "detail rows", "refund rows", "payment rows", "rows one fen off", "bytes", "bytes gzipped"],
        [
            [label, rows, day_refunds, day_refunds, planted if label == "differs" else 0, len(pl), len(pk)]
            for label, (pl, pk, _s) in bills.items()
        ],
    )
    timing_rows = [
        ["(a) gunzip (the gateway's download does it)", *_stats(gunzip_t, rows)],
        ["(a) check_sha1", *_stats(sha_t, rows)],
        ["(a) parse_bill", *_stats(parse_t, rows)],
        ["(a) gunzip + check_sha1 + parse_bill", *_stats(all_t, rows)],
        ["(b) reconcile_day, clean: compare + record", *_stats(clean_t, rows)],
        [f"(c) reconcile_day, {planted:,} rows one fen off: compare + record", *_stats(differs_t, rows)],
        ["(a) + (b): the clean day, bill read to run recorded", a + b, None, None, rows / (a + b)],
        ["(a) + (c): the day with differences", a + c, None, None, rows / (a + c)],
    ]
    report.table(
        f"seconds, median of {args.reps} (min, max); rows/s = bill rows / median",
        ["measurement", "median s", "min s", "max s", "rows/s"],
        timing_rows,
    )
    report.table(
        "the split: reading the bill vs comparing and recording",
        ["day", "parse s (a)", "compare + record s", "parse share", "writing the differences"],
        [
            ["clean", a, b, f"{100 * a / (a + b):.0f}%", "-"],
            ["differs", a, c, f"{100 * a / (a + c):.0f}%", f"{c - b:+.3f} s for {planted:,} rows"],
        ],
    )
    report.table(
        "statements reconcile_day sent, one instrumented run each (seconds from before to after cursor_execute,"
        " rows fetched included)",
        ["bill", "statement", "sent", "seconds", "share of the run"],
        statement_rows,
    )
    report.table(
        "EXPLAIN of each statement kind, the first time reconcile_day sent it, on the seeded tables",
        ["archive rows", "statement", "table", "type", "key", "rows (estimate)", "Extra", "verdict"],
        explain_rows,
    )

    parse_rate = rows / med(parse_t)
    report.target(
        "parse_bill",
        f"{parse_rate:,.0f} rows/s ({med(parse_t):.2f} s for {rows:,} rows)",
        f">= {PARSE_TARGET_ROWS_PER_SECOND:,.0f} rows/s (its docstring)",
        parse_rate >= PARSE_TARGET_ROWS_PER_SECOND,
    )
    report.target(
        "no statement reads a table whole",
        "; ".join(scans) or "all use an index",
        "index for every statement",
        not scans,
    )
    report.note(
        f"N: the bill's {rows:,} detail rows are {day_refunds:,} refund rows (every refund of ours submitted that"
        f" Beijing day, {bill_date}) and {day_refunds:,} payment rows (those refunds' orders, paid the same day: every"
        " paid order is cancelled, so compare looks up the refunds of all of them, the worst case for ORPHAN_PAYMENT)."
    )
    report.note(
        f"refund_order: {day_refunds + older:,} finished refunds, {older:,} of them over the {OLDER_DAYS} days before"
        f" {bill_date - timedelta(days=1)}; goods_order2 the same ids, cancelled and refunded; ANALYZE after seeding,"
        " purge waited for. The archive is empty for the timed runs: every refund is found live, so the"
        " archive's out_refund_no lookup is never sent; after them the older refunds are copied into it"
        " (as prune would have moved them) and one more instrumented run EXPLAINs its order_id lookup again."
    )
    if empty_scans:
        report.note(
            f"On the empty archive MariaDB plans {', '.join(empty_scans)}: a full scan of an empty table;"
            f" the target judges the plan on the archive of {older:,}."
        )
    report.note(
        "(b) and (c) get the bill already parsed (the split's other half is (a)); the neighbours' bills are NoBill."
        " All runs on the same database, each replacing the day's rows; the two instrumented runs came first and"
        " warmed the buffer pool (testsupport/mariadb.py's 256 MB)."
    )
    return report.save(args)


def _stats(took: list[float], rows: int) -> list:
    return [reporting.median(took), min(took), max(took), rows / reporting.median(took)]


if __name__ == "__main__":
    sys.exit(main())
