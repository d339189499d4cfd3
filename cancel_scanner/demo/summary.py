"""The demo's closing screen: what happened, the checks it can prove, and where to look next."""

from __future__ import annotations

import shlex
import shutil
import sys
import textwrap
from collections import Counter
from pathlib import Path

from sqlalchemy import Engine, text

from cancel_scanner.demo.plan import PARTIAL_UNITS, Plan
from cancel_scanner.demo.screen import WIDTH, fit, pad
from cancel_scanner.demo.seed import goods_snapshot
from cancel_scanner.i18n import N_, tr, yuan
from cancel_scanner.scanners.intake import MESSAGES


def _rows(db: Engine, sql: str) -> list:
    with db.connect() as conn:
        return list(conn.execute(text(sql)).all())


# Rejection codes in the contract's order (intake's messages are declared in it); anything else after them.
CODE_ORDER = tuple(MESSAGES)
LABEL, COUNT, AMOUNT = 26, 6, 12  # the summary's columns


def _code_rank(code: str) -> tuple[int, str]:
    return (CODE_ORDER.index(code) if code in CODE_ORDER else len(CODE_ORDER), code)


def summarize(db: Engine, plan: Plan, before: dict, emulator, elapsed: float, locale: str = "en") -> tuple[str, bool]:
    """The closing screen in ``locale``, and whether every check held."""
    t = tr(locale)
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
    add(pad(t(N_("Cancel requests")), LABEL) + pad(t(N_("count")), COUNT, right=True))
    ways = t(N_("{paid} paid: refund; {unpaid} unpaid: no refund")).format(paid=paid_ok, unpaid=len(accepted) - paid_ok)
    accepted_label, rejected_label = t(N_("accepted (OK)")), t(N_("rejected"))
    add(f"  {pad(accepted_label, LABEL - 2)}{len(accepted):{COUNT}}   {ways}")
    said = t(N_("code and the message the merchant reads:"))
    add(f"  {pad(rejected_label, LABEL - 2)}{len(rejected):{COUNT}}   {said}")
    by_code: dict[str, list] = {}
    for r in rejected:
        by_code.setdefault(r.result_code or "(none)", []).append(r)
    for code in sorted(by_code, key=_code_rank):
        head = f"    {code:{LABEL - 4}}{len(by_code[code]):{COUNT}}   "
        message = textwrap.wrap(by_code[code][0].result_msg or "", WIDTH - len(head)) or [""]
        add(head + message[0])
        for more in message[1:]:
            add(" " * len(head) + more)
    for o in plan.orders_of("partial"):
        part = _rows(
            db,
            f"SELECT order_status, cancelled_quantity, quantity, refunded_amount FROM goods_order2 WHERE id = {int(o.id)}",
        )[0]
        what = t(
            N_(
                "order {order}: {cancelled} of {quantity} units out of stock, {yuan} refunded; {status}, it ships the rest"
            )
        ).format(
            order=o.id,
            cancelled=part.cancelled_quantity,
            quantity=part.quantity,
            yuan=yuan(part.refunded_amount),
            status=part.order_status,
        )
        part_label = t(N_("partial cancel"))
        add(f"  {pad(part_label, LABEL - 2)}{1:{COUNT}}   {what}")
        if (part.order_status, part.cancelled_quantity) != ("PAID", PARTIAL_UNITS):
            problems.append(f"partial cancel of order {o.id}: {part.order_status}, {part.cancelled_quantity} cancelled")
    got = Counter(r.result_code for r in reqs)
    want = Counter(r.expect for r in plan.requests)
    if got != want:
        problems.append(f"result codes {dict(got)} differ from the seeded cases {dict(want)}")

    # Refunds by WeChat's final word.
    refunds = _rows(
        db, "SELECT wx_status, COUNT(*) AS n, SUM(refund_amount) AS fen FROM refund_order GROUP BY wx_status"
    )
    notes = {
        "SUCCESS": t(N_("paid back to the user")),
        "CLOSED": t(N_("no money moved: order FAILED,")),
        "ABNORMAL": t(N_("merchant must act")),
    }
    add()
    add(
        pad(t(N_("Refunds by WeChat status")), LABEL)
        + pad(t(N_("count")), COUNT, right=True)
        + pad(t(N_("amount")), AMOUNT, right=True)
    )
    indent = " " * (LABEL + COUNT + AMOUNT + 3)
    for r in sorted(refunds, key=lambda r: (r.wx_status != "SUCCESS", r.wx_status or "")):
        status = r.wx_status or t(N_("(no answer yet)"))
        add(f"  {pad(status, LABEL - 2)}{r.n:{COUNT}}{yuan(r.fen or 0):>{AMOUNT}}   {notes.get(r.wx_status, '')}")
        if r.wx_status == "CLOSED":
            add(indent + t(N_("stock and sales untouched")))
        if r.wx_status == "SUCCESS" and plan.orders_of("abnormal"):
            add(indent + t(N_("incl. {n} that was ABNORMAL first")).format(n=len(plan.orders_of("abnormal"))))
    total_fen = yuan(sum(r.fen or 0 for r in refunds))
    total_label = t(N_("total"))
    add(f"  {pad(total_label, LABEL - 2)}{sum(r.n for r in refunds):{COUNT}}{total_fen:>{AMOUNT}}")
    success_fen = sum(r.fen or 0 for r in refunds if r.wx_status == "SUCCESS")

    # Orders, as the shop's order system now sees them.
    orders = _rows(
        db,
        "SELECT order_status, refund_status, is_deleted, COUNT(*) AS n FROM goods_order2"
        " GROUP BY order_status, refund_status, is_deleted ORDER BY order_status, refund_status, is_deleted",
    )
    add()
    add(pad(t(N_("Orders")), 18) + pad("refund_status", 14) + pad(t(N_("count")), COUNT, right=True))
    for r in orders:
        label = r.order_status + (t(N_(" (deleted)")) if r.is_deleted else "")
        add(f"  {pad(label, 16)}{r.refund_status:14}{r.n:{COUNT}}")

    # Goods: what came back on the shelf, what no longer counts as sold.
    after = goods_snapshot(db)
    expected = plan.expected_goods()
    add()
    add(pad(t(N_("Goods")), LABEL + 2) + pad(t(N_("stock before → after")), 24) + t(N_("sales before → after")))
    for gid, (name, stock0, sales0) in sorted(before.items()):
        _, stock1, sales1 = after[gid]
        stock = f"{stock0:>5} → {stock1:<5}({stock1 - stock0:+d})"
        sales = f"{sales0:>5} → {sales1:<5}({sales1 - sales0:+d})"
        add(f"  {pad(name, LABEL)}{stock:24}{sales}")
        if (stock1, sales1) != expected[gid]:
            problems.append(
                f"goods {gid}: stock/sales {stock1}/{sales1}, expected {expected[gid][0]}/{expected[gid][1]}"
            )

    # Unpaid orders: closed at WeChat before they were cancelled, or found paid.
    closed = [o for o in plan.orders_of("unpaid") if emulator.trade_state(o.order_no) == "CLOSED"]
    found = _rows(db, "SELECT COUNT(*) AS n FROM goods_order2_oplog WHERE event = 'PAYMENT_FOUND'")[0].n
    add()
    add(t(N_("Unpaid orders at WeChat: {n} closed before cancelling;")).format(n=len(closed)))
    add("  " + t(N_("{n} found paid (notification lost): booked, then refunded")).format(n=found))
    if len(closed) != len(plan.orders_of("unpaid")):
        problems.append(
            f"{len(plan.orders_of('unpaid')) - len(closed)} unpaid order(s) cancelled without their payment closed"
        )
    if found != len(plan.orders_of("lost_payment")):
        problems.append(f"{found} lost payment(s) found, {len(plan.orders_of('lost_payment'))} seeded")

    # The gateway's side: the proof that nothing was paid twice.
    created = emulator.refunds_created
    twice = sorted(no for no, n in created.items() if n > 1)
    moved = sum(emulator.fen_refunded.values())
    add()
    add(
        t(N_("WeChat Pay sandbox: {created} refunds created for {numbers} refund numbers")).format(
            created=sum(created.values()), numbers=len(created)
        )
    )
    if twice:
        add("  " + t(N_("REFUND SENT TWICE: {numbers}")).format(numbers=", ".join(twice)))
        problems.append(f"refund numbers created more than once: {', '.join(twice)}")
    else:
        add("  " + t(N_("no refund sent twice: each out_refund_no created exactly once")))
    if moved == success_fen:
        add("  " + t(N_("money moved {yuan} = refunds SUCCESS in the database")).format(yuan=yuan(moved)))
    else:
        add(
            "  "
            + t(N_("MONEY MOVED {moved}, but refunds SUCCESS in the database total {success}")).format(
                moved=yuan(moved), success=yuan(success_fen)
            )
        )
        problems.append("money moved at the gateway differs from the refunds marked SUCCESS")

    add()
    if problems:
        add(t(N_("CHECKS FAILED:")))
        lines.extend(f"  {p}" for p in problems)
    else:
        add(t(N_("All settled in {seconds} s; every check passed.")).format(seconds=f"{elapsed:.1f}"))
    return "\n".join(lines) + "\n", not problems


def _this_command() -> str:
    """How the user started us, so the hint runs as printed from where they are: the console script by
    its bare name only when that name finds this very script on PATH (scripts/demo starts
    .venv/bin/cancel-scanner, which is not on PATH), else as it was started; or python cli.py."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is None:
        return "cancel-scanner"
    if argv0.suffix == ".py":
        return f"{shlex.quote(sys.executable)} {shlex.quote(str(argv0.resolve()))}"
    on_path = shutil.which(argv0.name)
    if on_path is not None and Path(on_path).resolve() == argv0.resolve():
        return argv0.name
    return shlex.quote(str(argv0))


def where_to_look(db_file: Path, log_path: Path, warnings: int, locale: str = "en") -> str:
    t = tr(locale)
    shown = t(N_(" ({n} warnings/errors shown above)")).format(n=warnings) if warnings else ""
    url = shlex.quote(f"sqlite:///{db_file}")
    database, inspect, log = t(N_("Database")), t(N_("inspect it with:")), t(N_("Log"))
    return (
        f"\n{pad(database, 10)}{db_file}\n"
        f"  {inspect}\n  CANCEL_SCANNER_DB_URL={url} {_this_command()} status\n"
        f"{pad(log, 10)}{log_path}{shown}\n"
    )
