"""`cancel-scanner history ORDER` (issue 28, first part): the story of one order in time order, found by
its id, its order_no or a refund's number, with the operator actions that named it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cancel_scanner.cli import main
from cancel_scanner.scanners.intake import out_refund_no_for
from tests.flow import add_goods, add_order, request_cancel

ENV = {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}


def cli(tmp_path, world, *argv: str):
    path = tmp_path / "jobs.yaml"
    path.write_text(f"database_url: {world.config.database_url}\nlocale: en\n")
    return CliRunner().invoke(main, ["--config", str(path), *argv], env=ENV)


def test_the_story_of_an_order_in_time_order_with_the_actions_that_named_it(tmp_path, world):
    add_goods(world.db, 1, stock=10, sales=5)
    add_order(world.db, 21, goods_id=1, quantity=3, amount=900)
    add_order(world.db, 121, goods_id=1, quantity=1, amount=900)  # 121 names "21" in part only
    world.emulator.close_refunds_for(out_refund_no_for(21, 1))
    request_cancel(world.db, 21, quantity=1)
    world.settle()
    assert cli(tmp_path, world, "--operator", "alice", "reissue", "21").exit_code == 0
    assert cli(tmp_path, world, "reissue", "121").exit_code == 2
    with world.db.begin() as conn:  # the command ran on the database's clock; the flow here runs on the test's
        conn.exec_driver_sql("UPDATE refund_order SET next_attempt_at = NULL WHERE refund_seq = 2")
    world.settle()

    told = cli(tmp_path, world, "history", out_refund_no_for(21, 2))  # found by a refund's number
    assert told.exit_code == 0, told.output
    lines = told.output.splitlines()
    assert lines[0].startswith("order 21 (SO0000000021): PAID, refund NONE, 1 of 3 unit(s) cancelled")
    kinds = [line.split()[3] for line in lines[1:-1]]
    # (this test's flow runs on its own clock and the rows' created_at on the database's: only what is told)
    assert {"request", "answer", "event", "refund", "action"} <= set(kinds)
    events = [line for line in lines if " event " in line]
    assert events.index(next(e for e in events if "PART_CANCELLED#1" in e)) < events.index(
        next(e for e in events if "REFUND_REISSUED#2" in e)
    )
    text = told.output
    assert "PART_CANCELLED#1" in text and "REFUND_REISSUED#2" in text and "PART_STOCK_RESTORED#2" in text
    assert f"refund {out_refund_no_for(21, 1)} #1 (part): 300 fen of 900, WeChat CLOSED" in text
    assert "reissue order_ids=21" in text and "by alice: ok" in text
    assert "order_ids=121" not in text  # another order's action
    with world.db.connect() as conn:
        changed = conn.exec_driver_sql("SELECT changed FROM operator_action WHERE operator = 'alice'").scalar()
    assert changed == f"order 21: {out_refund_no_for(21, 2)} replaces {out_refund_no_for(21, 1)}"
    assert lines[-1] == "pending now: nothing"

    as_json = json.loads(cli(tmp_path, world, "history", "--json", "SO0000000021").output)
    assert as_json["order"]["id"] == 21 and as_json["pending"] == []
    assert [e["kind"] for e in as_json["events"]] == kinds
    assert cli(tmp_path, world, "history", "nope").exit_code == 2
