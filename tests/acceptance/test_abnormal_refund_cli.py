"""`cancel-scanner abnormal-refund` through the CLI, beside a live-mode daemon on MariaDB.

Given a paid order whose refund WeChat reports ABNORMAL (the emulator, in this process, says so),
when the operator sends it on to the user's bank card with the details in a file, then the daemon
follows it to SUCCESS and finishes the order, and the account number and the holder's name are in
no daemon log, no output of the command, no table and nothing the emulator logged or kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.acceptance import harness
from testsupport import shop
from testsupport.logs import log_lines
from testsupport.processes import run_cli, write_config
from testsupport.waiting import wait_until

ACCOUNT = "6217003810026541234"
HOLDER = "欧阳娜娜"
ORDER_ID, QUANTITY, PAID_FEN = 501, 2, 2599
SETTLE_SECONDS = 60
EXIT_BOUND_SECONDS = harness.SHUTDOWN_TIMEOUT_SECONDS + 3


def details_file(directory: Path, content: str, mode: int = 0o600) -> Path:
    path = directory / "card.txt"
    path.write_text(content, encoding="utf-8")
    os.chmod(path, mode)
    return path


def every_table_as_text(db) -> str:
    """Every row of every table and view in the database, as text."""
    with db.connect() as conn:
        names = [r[0] for r in conn.execute(text("SHOW FULL TABLES"))]
        return "\n".join(repr(tuple(r)) for name in names for r in conn.execute(text(f"SELECT * FROM `{name}`")))


def to_the_users_card(config, env, refund_id, card, before=(), after=()):
    """`cancel-scanner abnormal-refund ROW --to user-bank-card` with the card's details in a file, as an
    operator types it, with ``config``, from the card file's directory; ``before`` and ``after``
    are further options."""
    return run_cli(
        [
            *before,
            "abnormal-refund",
            str(refund_id),
            "--to",
            "user-bank-card",
            "--bank-type",
            "ICBC_DEBIT",
            "--bank-details-file",
            str(card),
            *after,
        ],
        config=config,
        env=env,
        cwd=card.parent,
        timeout=60,
    )


@pytest.mark.mysql
@pytest.mark.slow
def test_an_abnormal_refund_sent_to_the_users_bank_card_through_the_cli_settles_and_leaves_no_trace(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys", success_delay=0.2)
    harness.loud_emulator_logs()  # this test reads what the emulator logs, too
    opened: list[tuple] = []
    emu.emulator.on_bank_details = lambda number, bank_type, account, name: opened.append(
        (number, bank_type, account == ACCOUNT, name == HOLDER)
    )
    with log_lines("{message} {extra} {exception}", filter="cancel_scanner.gateway.emulator") as emulator_lines:
        shop.insert_goods(mysql_db, {1: (10, 5)})
        order = shop.order_row(ORDER_ID, goods_id=1, quantity=QUANTITY, amount=PAID_FEN)
        shop.insert_orders(mysql_db, [order])
        emu.emulator.abnormal_for(order["no"])  # the user's card turns out to be frozen
        daemon = daemons(tmp_path, harness.daemon_config(mysql_url, emu), emu.env(), log_level="DEBUG")
        daemon.start()
        daemon.wait_started()
        shop.request_cancel(mysql_db, ORDER_ID, "MERCHANT_CANCEL", "clerk-1", "out of stock")
        refund = wait_until(
            lambda: harness.q_rows(
                mysql_db, "SELECT id, out_refund_no, wx_status FROM refund_order WHERE order_id = :o", o=ORDER_ID
            ),
            SETTLE_SECONDS,
            "the refund to be reported ABNORMAL",
            until=lambda rs: rs and rs[0]["wx_status"] == "ABNORMAL",
            daemons=[daemon],
        )[0]
        card = details_file(tmp_path, f"{ACCOUNT}\n{HOLDER}\n")

        done = to_the_users_card(
            daemon.config_path, emu.env(), refund["id"], card, ["--log-level", "DEBUG"], ["--by", "ops-lee"]
        )

        assert done.returncode == 0, done.stderr
        assert f"refund row {refund['id']} ({refund['out_refund_no']}): sent on to the user's bank card" in done.stdout
        harness.wait_settled(mysql_db, SETTLE_SECONDS, [daemon])
        again = to_the_users_card(daemon.config_path, emu.env(), refund["id"], card)
        harness.stop_all(daemon, timeout=EXIT_BOUND_SECONDS)

    # The daemon followed it to SUCCESS and finished the order; the money moved once, to the card.
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"refund row {refund['id']}: refused NOT_PENDING: refund {refund['out_refund_no']}"
        " is finished (SUCCESS): only a refund WeChat reports ABNORMAL can go to a bank card"
    ]
    final = harness.q_rows(mysql_db, "SELECT * FROM refund_order WHERE id = :i", i=refund["id"])[0]
    assert (final["wx_status"], final["progress_success"], final["sync_success"], final["lease_owner"]) == (
        "SUCCESS",
        1,
        1,
        None,
    )
    placed = harness.q_rows(mysql_db, "SELECT * FROM goods_order2 WHERE id = :o", o=ORDER_ID)[0]
    assert (placed["refund_status"], placed["stock_success"], placed["sales_success"]) == ("REFUNDED", 1, 1)
    assert harness.q_rows(mysql_db, "SELECT stock, sales FROM goods WHERE id = 1") == [
        {"stock": 10 + QUANTITY, "sales": 5 - QUANTITY}
    ]
    events = {
        r["event"]: r["detail"]
        for r in harness.q_rows(
            mysql_db, "SELECT event, detail FROM goods_order2_oplog WHERE order_id = :o", o=ORDER_ID
        )
    }
    assert events["ABNORMAL_REFUND_APPLIED"].startswith("USER_BANK_CARD by ops-lee")
    assert {"REFUND_SUCCEEDED", "STOCK_RESTORED", "SALES_DECREMENTED"} <= set(events)
    snap = emu.emulator.snapshot()
    assert snap["refunds_created"] == {refund["out_refund_no"]: 1}
    assert snap["fen_refunded"] == {order["no"]: PAID_FEN}
    assert snap["abnormal_applies"] == {(refund["out_refund_no"], "USER_BANK_CARD"): 1}
    assert opened == [(refund["out_refund_no"], "ICBC_DEBIT", True, True)]  # decrypted, and right
    assert daemon.unexpected_exits() == []

    # Where the details must not be: every daemon log, the command's output, every table, the emulator.
    places = {
        **{
            f"daemon log {life.log_path.name}": life.log_path.read_text(encoding="utf-8", errors="replace")
            for life in daemon.lives
        },
        "CLI stdout": done.stdout,
        "CLI stderr": done.stderr,
        "second CLI": again.stdout + again.stderr,
        "tables": every_table_as_text(mysql_db),
        "emulator request log": repr(emu.emulator.logged_requests()),
        "emulator counters": repr(snap),
        "emulator log": "\n".join(emulator_lines),
    }
    assert any(
        "abnormal answered" in line for line in places["CLI stderr"].splitlines()
    )  # the call's own debug line is there
    assert any("'call': 'abnormal'" in line for line in emulator_lines)  # and the emulator's, for the apply
    for where in ("tables", *(k for k in places if k.startswith("daemon log"))):
        assert refund["out_refund_no"] in places[where], where  # the search reads real content
    found = {
        where: [name for name, secret in (("account", ACCOUNT), ("holder", HOLDER)) if secret in content]
        for where, content in places.items()
    }
    assert {where: names for where, names in found.items() if names} == {}


@pytest.fixture
def live_config(tmp_path, external_emulators) -> tuple[Path, dict[str, str]]:
    """A live-mode configuration (SQLite, never reached by these refusals) and its environment."""
    emu = external_emulators(tmp_path / "keys")
    config = write_config(
        tmp_path / "jobs.yaml", {"database_url": f"sqlite:///{tmp_path / 'db.sqlite'}", "wechat": emu.wechat_config()}
    )
    return config, emu.env()


@pytest.mark.parametrize(
    "content, says",
    [
        ("", "is empty"),
        (f"{ACCOUNT}\n", "has 1 line(s)"),
        (f"{ACCOUNT}\n{HOLDER}\nsomething else\n", "has 3 line(s)"),
        (f"\n{HOLDER}\n", "line 1 (the account number) is empty"),
    ],
)
def test_a_bad_bank_details_file_is_refused_in_one_line_that_never_echoes_it(tmp_path, live_config, content, says):
    config, env = live_config
    card = details_file(tmp_path, content)

    done = to_the_users_card(config, env, 7, card)

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "refused BAD_BANK_DETAILS" in done.stderr and says in done.stderr
    assert ACCOUNT not in done.stdout + done.stderr and HOLDER not in done.stdout + done.stderr


def test_without_a_file_or_a_terminal_and_in_sandbox_mode_it_refuses(tmp_path, live_config):
    config, env = live_config
    no_file = run_cli(
        ["abnormal-refund", "7", "--to", "user-bank-card", "--bank-type", "ICBC_DEBIT"],
        config=config,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    sandbox = write_config(tmp_path / "sandbox.yaml", {"database_url": f"sqlite:///{tmp_path / 'demo.sqlite'}"})
    in_sandbox = run_cli(
        ["abnormal-refund", "7", "--to", "merchant-bank-card"], config=sandbox, env={}, cwd=tmp_path, timeout=60
    )

    assert (no_file.returncode, no_file.stderr.splitlines()) == (
        2,
        [
            "refund row 7: refused BANK_DETAILS_MISSING: user-bank-card needs --bank-details-file PATH (or a terminal to type"
            " them into)"
        ],
    )
    assert in_sandbox.returncode == 2 and len(in_sandbox.stderr.splitlines()) == 1
    assert "refused SANDBOX_MODE" in in_sandbox.stderr
