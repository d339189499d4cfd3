"""The status page of a running daemon, read by a real browser: headless Chromium (Debian's
`chromium`; scripts/test installs it), live mode against the emulator, on MariaDB.

Given a daemon serving `/` and merchants' requests, two of them for orders that do not exist with
a reason that is HTML meant to run (`<img onerror>`, `<script>`), when the rejections reach the
page and Chromium loads it, then the DOM it ends with lists every stage, shows each hostile reason
as text in the rejected table, holds no `<img>` and no `<script>` element, and its title is the
page's own: no script ran. A control page carrying the same markup unescaped proves this Chromium
runs scripts and that `--dump-dom` shows what they did, so the page's clean DOM means something.

Without chromium these tests skip locally and FAIL under ``CI=true``, as the MariaDB tests do.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cancel_scanner.scanners import REGISTRY
from tests.acceptance import harness
from tests.acceptance.test_monitoring import free_port, get
from tests.conftest import IN_CI
from testsupport import shop
from testsupport.waiting import wait_until

IMG = "<img src=x onerror=alert(1)>"
TITLE_SCRIPT = "<script>document.title='pwned'</script>"
PAGE_TITLE = "cancel-scanner status"
REFRESH_SECONDS = 1  # the watcher's interval too: the rejections reach the page within a second or two
# Virtual time Chromium lets the page run (timers, an image's onerror) before it dumps the DOM. Kept
# below one refresh period: when the page's meta refresh fires within the budget, Chromium reloads
# it again and again and never prints the DOM.
VIRTUAL_TIME_BUDGET_MS = 900
CHROMIUM_TIMEOUT_SECONDS = 60
N = 3
MISSING_ORDERS = (900_001, 900_002)  # no such orders: intake rejects them with ORDER_NOT_FOUND


def chromium_binary() -> str:
    """The path of `chromium`; without it a skip, or a failure under CI=true."""
    found = shutil.which("chromium")
    if found:
        return found
    reason = "chromium not found on PATH (install Debian's chromium package; scripts/test does)"
    if IN_CI:
        pytest.fail(f"chromium is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def dump_dom(url: str, profile: Path) -> str:
    """The DOM as Chromium serialises it once the page loaded and its scripts (if any) ran."""
    cmd = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--dump-dom",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB: Chromium would crash on it
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_SECONDS)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "</html>" in done.stdout, f"chromium printed no DOM:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


class Dom(HTMLParser):
    """What a test asks of a DOM: the elements it holds, its title, and each table's rows by the table's id."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)  # cell text as the browser shows it
        self.elements: list[str] = []
        self.title = ""
        self.tables: dict[str, list[list[str]]] = {}
        self._in_title = False
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(tag)
        if tag == "title":
            self._in_title = True
        elif tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)

    def table(self, table_id: str) -> list[dict[str, str]]:
        """The table's body rows as {header: cell text}."""
        assert table_id in self.tables, f"no table with id={table_id!r}; tables: {sorted(self.tables)}"
        head, *rows = self.tables[table_id]
        return [dict(zip(head, row)) for row in rows]


def test_chromium_runs_a_pages_scripts_and_dump_dom_shows_what_they_did(tmp_path):
    """The control: such markup, unescaped, becomes elements and runs, timers and onerror included.
    (Not alert(): a dialog would stall the headless browser, and the test would only time out.)"""
    control = tmp_path / "control.html"
    control.write_text(
        "<!doctype html><html><head><title>control</title></head><body>"
        "<p><img src=x onerror=\"document.body.dataset.onerror='ran'\"></p>"
        f"<script>setTimeout(function () {{ document.title = 'pwned' }}, {VIRTUAL_TIME_BUDGET_MS // 2})</script>"
        "</body></html>",
        encoding="utf-8",
    )
    markup = dump_dom(control.as_uri(), tmp_path / "profile")
    dom = Dom(markup)
    assert dom.title == "pwned", markup
    assert 'data-onerror="ran"' in markup and "img" in dom.elements and "script" in dom.elements


@pytest.mark.mysql
def test_a_browser_shows_hostile_reasons_as_text_and_runs_nothing(
    tmp_path, mysql_db, mysql_url, external_emulators, daemons
):
    emu = external_emulators(tmp_path / "keys")
    port = free_port()
    orders = harness.paid_orders(mysql_db, emu, N)
    config = harness.daemon_config(
        mysql_url, emu, monitoring={"listen": f"127.0.0.1:{port}", "refresh_seconds": REFRESH_SECONDS}
    )
    daemon = daemons(tmp_path, config, emu.env())
    daemon.start()
    daemon.wait_started()
    url = f"http://127.0.0.1:{port}/"
    assert wait_until(lambda: get(url + "healthz")[0] == 200, 10, "healthz", daemons=[daemon])

    shop.insert_requests(
        mysql_db,
        [(o["id"], "MERCHANT_CANCEL", "clerk", "changed my mind") for o in orders]
        + [
            (MISSING_ORDERS[0], "MERCHANT_CANCEL", "clerk", IMG),
            (MISSING_ORDERS[1], "MERCHANT_CANCEL", "clerk", TITLE_SCRIPT),
        ],
    )
    harness.wait_settled(mysql_db, 60, [daemon])

    def page_with_both_rejections() -> str | None:
        status, body = get(url)
        escaped = (
            "&lt;img src=x onerror=alert(1)&gt;",
            "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;",
        )
        return body if status == 200 and all(e in body for e in escaped) else None

    served = wait_until(page_with_both_rejections, 20, "both rejections on the status page", daemons=[daemon])
    assert IMG not in served and TITLE_SCRIPT not in served

    markup = dump_dom(url, tmp_path / "profile")
    dom = Dom(markup)
    # Every stage is a row of the stages table.
    assert [row["stage"] for row in dom.table("stages")] == list(REGISTRY.names)
    assert all(row["state"] == "up" for row in dom.table("stages")), dom.table("stages")
    # Each hostile reason is text in its row, never an element.
    rejected = {int(row["order_id"]): row for row in dom.table("rejected")}
    assert set(rejected) == set(MISSING_ORDERS)  # the normal cancels were accepted, not rejected
    assert rejected[MISSING_ORDERS[0]]["reason"] == IMG
    assert rejected[MISSING_ORDERS[1]]["reason"] == TITLE_SCRIPT
    assert all(row["result_code"] == "ORDER_NOT_FOUND" for row in rejected.values())
    assert "&lt;img src=x onerror=alert(1)&gt;" in markup
    assert "<img" not in markup and "img" not in dom.elements
    # Nothing ran: no script element, and the title is still the page's own.
    assert "script" not in dom.elements
    assert dom.title == PAGE_TITLE, dom.title
    daemon.sigterm()
    assert daemon.wait(harness.SHUTDOWN_TIMEOUT_SECONDS + 3) == 0


def test_a_browser_opens_the_page_behind_a_token_with_basic_auth_and_not_without(tmp_path):
    """Issue 24, item 3: off loopback the page needs the token; a person's browser gives it as basic auth."""
    from cancel_scanner.monitoring.page import PageView
    from cancel_scanner.monitoring.server import MonitoringServer

    token = "browser-token-of-the-page-0001"
    page = lambda: PageView(snapshot=None, refresh_seconds=5, host="shop-1:1", now=0.0)  # noqa: E731
    srv = MonitoringServer(
        None, "127.0.0.1", 0, alive=lambda: True, db=None, gateway_ready=lambda: True, page=page, token=token
    ).start()
    try:
        opened = Dom(dump_dom(f"http://ops:{token}@127.0.0.1:{srv.port}/", tmp_path / "with"))
        refused = get(f"http://127.0.0.1:{srv.port}/")  # a browser asks for the credentials: no page
    finally:
        srv.stop()
    assert opened.title == PAGE_TITLE
    assert refused[0] == 401 and PAGE_TITLE not in refused[1]
