"""`cancel-scanner prune` in a subprocess on MariaDB: a dry run, the run, and an age it refuses."""

from __future__ import annotations

import re

import pytest

from tests.pruning import assert_moved_whole, live_and_archived, seed, shop_bytes, snapshot
from testsupport.processes import run_cli, write_config

ENV = {"CANCEL_SCANNER_ALLOW_SANDBOX": "1"}  # the default sandbox wechat section, on MariaDB; prune calls nobody
TABLES = ("req_order_ops", "refund_order", "goods_order2_oplog")


def table_lines(stdout: str, verb: str) -> dict[str, tuple[int, int]]:
    """{table: (rows, batches)} from prune's lines ``TABLE  moved  N rows in B batches, S s``."""
    found = {}
    for line in stdout.splitlines():
        match = re.match(rf"(\w+)\s+{verb}\s+([\d,]+) rows in ([\d,]+) batches, [\d.]+ s$", line)
        if match:
            found[match.group(1)] = (int(match.group(2).replace(",", "")), int(match.group(3).replace(",", "")))
    return found


@pytest.mark.mysql
def test_prune_dry_run_then_prune_then_an_age_under_a_day_refused(tmp_path, mysql_db, mysql_url):
    seeded = seed(mysql_db)
    before, shop = snapshot(mysql_db), shop_bytes(mysql_db)
    config = write_config(
        tmp_path / "jobs.yaml", {"database_url": mysql_url, "prune": {"batch_size": 7}, "locale": "en"}
    )  # its lines read in English
    expected = {name: len(seeded.moves[name]) for name in TABLES}

    dry = run_cli(["prune", "--older-than", "90d", "--dry-run"], config=config, env=ENV, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert re.match(
        r"prune --dry-run: rows finished before \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(database time - 90d\),"
        r" batches of 7, at most 1,000,000 rows per table; nothing is moved$",
        dry.stdout.splitlines()[0],
    )
    counted = table_lines(dry.stdout, "would move")
    assert {name: rows for name, (rows, _b) in counted.items()} == expected
    assert dry.stdout.splitlines()[-1] == f"prune: would move {sum(expected.values()):,} rows"
    assert snapshot(mysql_db) == before and shop_bytes(mysql_db) == shop
    assert not any(archived for _live, archived in live_and_archived(mysql_db).values())

    done = run_cli(["prune", "--older-than", "90d"], config=config, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert table_lines(done.stdout, "moved") == counted  # the dry run's rows and batches, exactly
    assert done.stdout.splitlines()[-1] == f"prune: moved {sum(expected.values()):,} rows"
    assert_moved_whole(mysql_db, before, seeded)
    assert shop_bytes(mysql_db) == shop

    again = run_cli(["prune", "--older-than", "90d", "--batch-size", "3"], config=config, env=ENV, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "batches of 3" in again.stdout and table_lines(again.stdout, "moved") == dict.fromkeys(TABLES, (0, 0))

    for age, why in (
        ("1h", "is under 1 day"),
        ("23h", "is under 1 day"),
        ("ninety", "is not an age"),
        ("90", "is not an age"),
    ):
        refused = run_cli(["prune", "--older-than", age], config=config, env=ENV, cwd=tmp_path)
        assert refused.returncode == 2, (age, refused.stdout, refused.stderr)
        assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1, (age, refused.stderr)
        assert refused.stderr.startswith("cancel-scanner: --older-than: ") and why in refused.stderr
    assert_moved_whole(mysql_db, before, seeded)


@pytest.mark.mysql
def test_ctrl_c_stops_prune_after_the_batch_in_hand_and_a_rerun_finishes(tmp_path, mysql_db, mysql_url):
    import signal
    import subprocess
    import sys

    from testsupport.processes import CLI, cli_env

    seeded = seed(mysql_db, finished_orders=2000)
    before = snapshot(mysql_db)
    config = write_config(tmp_path / "jobs.yaml", {"database_url": mysql_url, "locale": "en"})  # read in English
    proc = subprocess.Popen(
        [sys.executable, str(CLI), "--config", str(config), "prune", "--older-than", "90d", "--batch-size", "1"],
        cwd=tmp_path,
        env=cli_env(ENV),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    header = proc.stdout.readline()  # printed just before the first batch
    assert header.startswith("prune: rows finished before "), header
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping after the batch in hand" in err
    assert out.splitlines()[0].startswith("req_order_ops") and "(stopped)" in out.splitlines()[0]
    assert out.splitlines()[-1].endswith("; stopped before the end: run again for the rest")
    for name, (live, archived) in live_and_archived(mysql_db).items():
        assert not live & archived and live | archived == set(before[name]), name
    assert live_and_archived(mysql_db)["req_order_ops"][0] - seeded.stays["req_order_ops"]  # not done yet

    rerun = run_cli(["prune", "--older-than", "90d"], config=config, env=ENV, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert_moved_whole(mysql_db, before, seeded)
