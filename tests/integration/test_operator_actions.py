"""Every operator action recorded (issue 28, its first part): the command, its arguments without a
secret or a bank detail, the system user and host, --operator, start and end, how it ended, and what
it changed; a command run on a schema without the table still runs."""

from __future__ import annotations

import getpass
import socket

from click.testing import CliRunner

from cancel_scanner.cli import main
from tests.flow import rows


def cli(path, *argv: str):
    return CliRunner().invoke(main, ["--config", str(path), *argv])


def test_each_command_leaves_a_row_saying_who_ran_what_when_and_how_it_ended(tmp_path):
    from cancel_scanner.engine.db import make_engine

    path = tmp_path / "jobs.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'x.db'}\nlocale: en\n")
    assert cli(path, "initdb").exit_code == 0
    assert cli(path, "--operator", "alice", "reissue", "999", "--reason", "customer called").exit_code == 2
    assert cli(path, "requeue", "submit_refund", "5", "6").exit_code == 0
    assert cli(path, "migrate").exit_code == 0
    db = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        actions = rows(db, "SELECT * FROM operator_action ORDER BY id")
    finally:
        db.dispose()
    assert [(a["command"], a["outcome"], a["exit_code"]) for a in actions] == [
        ("reissue", "refused", 2),
        ("requeue", "ok", 0),
        ("migrate", "ok", 0),
    ]
    reissued = actions[0]
    assert "order_ids=999" in reissued["arguments"] and "why=customer called" in reissued["arguments"]
    assert (reissued["operator"], reissued["os_user"], reissued["host"]) == (
        "alice",
        getpass.getuser(),
        socket.gethostname(),
    )
    assert all(a["started_at"] and a["ended_at"] for a in actions)
    assert actions[1]["operator"] is None and "row_ids=5,6" in actions[1]["arguments"]
    assert actions[1]["changed"] == "submit_refund: 0 row(s) requeued" and reissued["changed"] is None


def test_bank_details_never_reach_the_record(tmp_path):
    from cancel_scanner.engine.db import make_engine

    path = tmp_path / "jobs.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'x.db'}\nlocale: en\n")
    assert cli(path, "initdb").exit_code == 0
    details = tmp_path / "bank.txt"
    details.write_text("bank_account: 6222020200112233445\nreal_name: 张三\n", encoding="utf-8")
    done = cli(
        path,
        "abnormal-refund",
        "7",
        "--to",
        "user-bank-card",
        "--bank-type",
        "ICBC_DEBIT",
        "--bank-details-file",
        str(details),
    )
    assert done.exit_code != 0, done.output  # refused (sandbox mode), but recorded
    db = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        (action,) = rows(db, "SELECT * FROM operator_action")
    finally:
        db.dispose()
    text = " ".join(str(v) for v in action.values())
    assert action["command"] == "abnormal-refund" and "row_id=7" in action["arguments"]
    assert "6222020200112233445" not in text and "张三" not in text and "ICBC_DEBIT" not in text
    assert str(details) not in text  # the path of the details file is a detail too
