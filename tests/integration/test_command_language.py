"""The operators' commands answer in the configured language (issue 27): Chinese by default, English with
locale: en; the codes in their lines are the same in both."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cancel_scanner.cli import main


@pytest.mark.parametrize(
    ("locale", "said"),
    [
        (None, "订单 999：拒绝 ORDER_NOT_FOUND：订单 999 不存在"),
        ("en", "order 999: refused ORDER_NOT_FOUND: order 999 does not exist"),
    ],
)
def test_reissue_and_requeue_speak_the_configured_language(tmp_path, locale, said):
    path = tmp_path / "jobs.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'x.db'}\n" + (f"locale: {locale}\n" if locale else ""))
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(path), "initdb"]).exit_code == 0
    refused = runner.invoke(main, ["--config", str(path), "reissue", "999"])
    assert refused.exit_code == 2 and said in refused.output, refused.output
    requeued = runner.invoke(main, ["--config", str(path), "requeue", "submit_refund", "5"])
    assert requeued.exit_code == 0
    expected = "submit_refund：1 行中 0 行已重新排队" if locale is None else "submit_refund: 0 of 1 row(s) requeued"
    assert expected in requeued.output, requeued.output
