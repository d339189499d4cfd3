"""An adversarial reviewer's attacks on the operator tools (reissue, abnormal-refund, reconcile, prune)
and how they meet the flow's stages. Each test is a bug that was found, and stays fixed.

On SQLite and MariaDB, real parts, the flow's World and its injected clock.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cancel_scanner.engine.clock import DbClock
from cancel_scanner.operations.prune import prune
from cancel_scanner.operations.reconcile import reconcile_day
from tests.flow import T0, scalar
from tests.integration.test_reconcile import DAY, fetcher, our_bill, refunded_day


def prune_everything_finished(world) -> None:
    """prune as the daily job would run it a few days later: every settled row of today is archived."""
    later = DbClock(world.db)() + timedelta(days=3)
    prune(world.db, older_than=timedelta(days=1), batch_size=100, now=later)


def test_a_refund_missing_at_wechat_is_reported_even_after_prune_archived_it(world):
    refunded_day(world, n=3)
    bill = our_bill(world)
    lost = bill.refunds[0]
    bill = replace(bill, refunds=bill.refunds[1:], rows=bill.rows - 1)  # WeChat's bill lacks one refund of ours
    prune_everything_finished(world)
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order") == 0
    assert scalar(world.db, "SELECT COUNT(*) FROM refund_order_archive") == 3

    result = reconcile_day(world.db, fetcher({DAY: bill}), DAY, now=T0)

    assert [(d.kind, d.out_refund_no) for d in result.diffs] == [("MISSING_AT_WECHAT", lost.out_refund_no)]
    assert result.state == "DIFFERS"


def test_an_archived_day_that_matches_the_bill_is_clean(world):
    refunded_day(world, n=3)
    bill = our_bill(world)
    prune_everything_finished(world)
    result = reconcile_day(world.db, fetcher({DAY: bill}), DAY, now=T0)
    assert (result.state, result.diffs) == ("CLEAN", ())


def test_an_order_id_beyond_bigint_is_a_usage_error_and_the_other_ids_are_not_lost(tmp_path):
    from click.testing import CliRunner

    from cancel_scanner.cli import main

    path = tmp_path / "jobs.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'x.db'}\n")
    assert CliRunner().invoke(main, ["--config", str(path), "initdb"]).exit_code == 0
    for argv in (["reissue", "7", str(2**64)], ["abnormal-refund", str(2**64), "--to", "merchant-bank-card"]):
        result = CliRunner().invoke(main, ["--config", str(path), *argv])
        assert result.exit_code == 2, result.output  # bad usage, said before anything runs: not "OverflowError", exit 1
        assert "Traceback" not in result.output and "OverflowError" not in result.output
