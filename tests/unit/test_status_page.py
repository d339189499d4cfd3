"""The status page, rendered from hand-built snapshots: what it lists, and that nothing a merchant
or an exception wrote can become markup.

Given a snapshot holding a down stage, failed rows, an ABNORMAL refund and rejected requests whose
text is hostile HTML, when the page renders, then every figure is there, every hostile string is
escaped (never raw), and the page has no script and no outside URL.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cancel_scanner.alerts.deliver import Alert
from cancel_scanner.engine.status import StageDown, StageStatus, Status
from cancel_scanner.monitoring.page import PageView, render, yuan
from cancel_scanner.monitoring.snapshot import Listing, Snapshot

IMG = "<img src=x onerror=alert(1)>"
BREAKOUT = '"><script>alert(1)</script>'
TAKEN_AT = 1_700_000_000.0
DB_NOW = datetime(2023, 11, 14, 22, 13, 20)


def hostile_snapshot() -> Snapshot:
    stages = (
        StageStatus(
            "intake", pending=0, waiting=0, failed=2, oldest_pending_seconds=None, done_by_daemons=40, daemons=1
        ),
        StageStatus(
            "submit_refund",
            pending=7,
            waiting=3,
            failed=1,
            oldest_pending_seconds=600.0,
            done_by_daemons=12,
            daemons=1,
            down=(StageDown("shop-1:4242", 180.0, f"OperationalError: {IMG}"),),
        ),
        StageStatus("poll_refund", pending=1, waiting=1, failed=0, oldest_pending_seconds=5.0, daemons=1),
        StageStatus("restore_stock", pending=0, waiting=0, failed=1, oldest_pending_seconds=None),
    )
    status = Status(
        now=DB_NOW,
        stages=stages,
        daemons=("shop-1:4242",),
        counts=(
            ("abnormal_refunds", "ABNORMAL refunds needing the merchant's action", 1),
            ("channel_facts_open", "done at the payment channel, not recorded here yet", 1),
        ),
        failed_notes=(("intake", "request(s) rejected with a result code (req_order_ops.result_code)"),),
    )
    listings = (
        Listing(
            "rejected",
            "Latest rejected requests",
            (
                {
                    "id": 9,
                    "order_id": 404,
                    "op_type": "MERCHANT_CANCEL",
                    "quantity": 2,
                    "operator": BREAKOUT,
                    "reason": IMG,
                    "result_code": "ORDER_NOT_FOUND",
                    "result_msg": "no such order",
                    "created_at": DB_NOW,
                },
                {
                    "id": 8,
                    "order_id": 405,
                    "op_type": "MERCHANT_CANCEL",
                    "operator": "clerk",
                    "reason": BREAKOUT,
                    "result_code": "ORDER_NOT_FOUND",
                    "result_msg": None,
                    "created_at": DB_NOW,
                },
            ),
            "intake",
        ),
        Listing(
            "failed:submit_refund",
            "submit_refund: rows that need a person",
            ({"id": 31, "order_id": 77, "attempts": 5, "last_error": f"PARAM_ERROR {BREAKOUT}", "updated_at": DB_NOW},),
            "submit_refund",
        ),
        Listing("failed:poll_refund", "poll_refund: rows that need a person", (), "poll_refund"),
        # goods_order2's stages name their flag columns with a prefix, as the snapshot selects them
        Listing(
            "failed:restore_stock",
            "restore_stock: rows that need a person",
            (
                {
                    "id": 78,
                    "order_id": 78,
                    "stock_attempts": 3,
                    "stock_last_error": "GOODS_GONE: goods 5",
                    "updated_at": DB_NOW,
                },
            ),
            "restore_stock",
        ),
        # The shop's trigger text is the shop's: hostile too.
        Listing(
            "channel_facts_open",
            "Done at the payment channel, not recorded here yet",
            (
                {
                    "stage": "close_unpaid",
                    "row_id": 7,
                    "fact": "PAYMENT_CLOSED",
                    "number": "SO0000000007",
                    "detail": "trade closed at WeChat Pay",
                    "reason": f"SHOP_REFUSED: (a shop trigger said: {IMG})",
                    "last_seen_at": DB_NOW,
                },
            ),
        ),
        Listing(
            "abnormal_refunds",
            "ABNORMAL refunds needing the merchant's action",
            ({"id": 55, "order_id": 78, "out_refund_no": "CSR78-1", "refund_amount": 12345, "submitted_at": DB_NOW},),
            "poll_refund",
        ),
    )
    return Snapshot(status=status, listings=listings, taken_at=TAKEN_AT)


def alert(state: str, rule: str, summary: str, stage: str | None, minute: int) -> Alert:
    return Alert(
        rule=rule, state=state, summary=summary, stage=stage, value=1, at=datetime(2023, 11, 14, 22, minute, tzinfo=UTC)
    )


def page(snapshot: Snapshot | None = None, **kwargs) -> str:
    view = {"snapshot": snapshot, "refresh_seconds": 5, "host": "shop-1:4242", "now": TAKEN_AT + 3, **kwargs}
    return render(PageView(**view))


@pytest.fixture
def hostile_page() -> str:
    return page(
        hostile_snapshot(),
        alerts=(
            alert("firing", "stage_down", f"stage submit_refund backs off: {IMG}", "submit_refund", 1),
            alert("resolved", "oldest_pending", "poll_refund caught up", "poll_refund", 2),
        ),
        firing=(("stage_down", "submit_refund"),),
    )


def section(html: str, table_id: str) -> str:
    start = html.index(f'<table id="{table_id}">')
    return html[start : html.index("</table>", start)]


def test_hostile_text_is_escaped_everywhere_and_never_raw(hostile_page):
    assert IMG not in hostile_page and BREAKOUT not in hostile_page
    assert "&lt;img src=x onerror=alert(1)&gt;" in hostile_page
    assert "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in hostile_page
    assert "<img" not in hostile_page and "<script" not in hostile_page.lower()
    assert "onerror=alert(1)>" not in hostile_page


def test_the_page_has_no_script_and_no_outside_url(hostile_page):
    for forbidden in ("http://", "https://", "<script", "javascript:", "<link", "@import", "url("):
        assert forbidden not in hostile_page.lower(), forbidden


def test_the_page_refreshes_itself_and_says_what_it_is(hostile_page):
    assert '<meta http-equiv="refresh" content="5">' in hostile_page
    assert '<html lang="en">' in hostile_page and '<meta charset="utf-8">' in hostile_page
    assert "<title>cancel-scanner status</title>" in hostile_page
    assert "shop-1:4242" in hostile_page and "snapshot taken 3 s ago" in hostile_page
    assert 'class="warn"' not in hostile_page  # a fresh reading: no warning


def test_a_fractional_refresh_rounds_up_to_a_whole_second():
    assert '<meta http-equiv="refresh" content="1">' in page(hostile_snapshot(), refresh_seconds=0.2)


def test_every_stage_is_a_row_and_a_down_stage_is_marked_with_its_reason(hostile_page):
    stages = section(hostile_page, "stages")
    for name in ("intake", "submit_refund", "poll_refund", "restore_stock"):
        assert f"<td>{name}</td>" in stages
    down_row = next(row for row in stages.split("<tr") if "submit_refund" in row)
    assert down_row.startswith(' class="down">')
    assert "DOWN for 3m: OperationalError: &lt;img src=x onerror=alert(1)&gt;" in down_row
    assert '<td class="n">12</td>' in down_row and "<td>10m</td>" in down_row  # done by daemons, oldest pending
    assert stages.count('class="down"') == 1
    assert "<td>not running</td>" in stages  # restore_stock: no daemon runs it
    down = section(hostile_page, "down")
    assert "shop-1:4242" in down and "<td>3m</td>" in down and "OperationalError: &lt;img" in down


def test_alerts_firing_now_and_recent_messages_newest_first(hostile_page):
    assert "<td>stage_down</td><td>submit_refund</td>" in section(hostile_page, "firing")
    history = section(hostile_page, "alerts")
    assert history.index("oldest_pending") < history.index("stage_down")  # newest first
    assert "2023-11-14 22:02:00+00:00" in history
    assert "backs off: &lt;img src=x onerror=alert(1)&gt;" in history


def test_abnormal_refunds_show_yuan_and_their_count(hostile_page):
    assert "ABNORMAL refunds: 1" in hostile_page
    abnormal = section(hostile_page, "abnormal")
    assert '<td class="n">123.45</td>' in abnormal and "CSR78-1" in abnormal and "12345" not in abnormal


def test_what_wechat_did_that_is_not_recorded_here_is_listed_with_its_count_and_reason(hostile_page):
    assert "Done at WeChat Pay, not recorded here yet: 1" in hostile_page
    facts = section(hostile_page, "facts")
    assert "PAYMENT_CLOSED" in facts and "SO0000000007" in facts and "close_unpaid" in facts
    assert "a shop trigger said: &lt;img" in facts


@pytest.mark.parametrize(
    "fen, shown",
    [
        (12345, "123.45"),
        (1, "0.01"),
        (100, "1.00"),
        (0, "0.00"),
        (-250, "-2.50"),
        (999_999_999_999_999_999, "9999999999999999.99"),
        ("1280", "12.80"),
        (None, ""),
    ],
)
def test_yuan_is_integer_arithmetic(fen, shown):
    assert yuan(fen) == shown


def test_rows_that_need_a_person_list_each_failed_stage_with_rows(hostile_page):
    person = hostile_page[
        hostile_page.index("Rows that need a person") : hostile_page.index("Latest rejected requests")
    ]
    assert "submit_refund: 1 failed for good" in person
    assert "PARAM_ERROR &quot;&gt;&lt;script&gt;" in person and '<td class="n">5</td>' in person
    assert "poll_refund" not in person  # its listing is empty
    assert "restore_stock: 1 failed for good" in person
    assert '<td>78</td><td>78</td><td class="n">3</td><td>GOODS_GONE: goods 5</td>' in person


def test_rejected_requests_show_who_asked_what_and_why_it_was_refused(hostile_page):
    rejected = section(hostile_page, "rejected")
    for column in ("order_id", "op_type", "quantity", "operator", "reason", "result_code"):
        assert f"<th>{column}</th>" in rejected
    assert (
        "<td>404</td><td>MERCHANT_CANCEL</td><td>2</td><td>&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;</td>"
        in rejected
    )
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td><td>ORDER_NOT_FOUND</td>" in rejected
    assert rejected.index("<td>9</td>") < rejected.index("<td>8</td>")  # as listed: the latest first


def test_before_the_first_reading_the_page_says_so():
    html = page(None)
    assert "no reading yet" in html and 'class="warn"' in html
    assert 'id="stages"' not in html and '<meta http-equiv="refresh" content="5">' in html


def test_a_failed_reading_warns_how_old_the_figures_are():
    html = page(hostile_snapshot(), last_error="OperationalError", now=TAKEN_AT + 42)
    assert "the database could not be read: OperationalError; figures below are 42 s old" in html
    assert 'id="stages"' in html  # the last reading is still shown
    assert "the database could not be read: OperationalError; no reading yet" in page(
        None, last_error="OperationalError"
    )


def test_a_hostile_error_class_or_host_is_escaped_too():
    html = page(None, last_error=IMG, host=BREAKOUT)
    assert IMG not in html and BREAKOUT not in html and "&lt;img" in html


def test_a_quiet_database_renders_empty_lists():
    status = Status(now=DB_NOW, stages=(StageStatus("intake", 0, 0, 0, None, daemons=1),), daemons=("shop-1:1",))
    html = page(Snapshot(status=status, taken_at=TAKEN_AT))
    assert "ABNORMAL refunds: 0" in html and 'id="rejected"' not in html and "running daemons: shop-1:1" in html
    assert "no alert message since this daemon started" in html
