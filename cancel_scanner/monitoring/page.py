"""The status page: a read-only view of the watcher's last snapshot, refreshing itself.

Plain HTML and inline CSS, no script, nothing fetched from elsewhere (the server's CSP says the
same to the browser). Every value that came from the database, a daemon's report or an alert goes
through ``_e`` (``html.escape``, quotes included): a request's ``reason`` and ``operator`` are
merchant input, and a stage's down reason quotes an exception's text.

Sections, top to bottom: who and how fresh (with a warning when the reading is missing or stale),
the stages, the stages down, the alerts, then a person's work lists: ABNORMAL refunds, rows that
failed for good, and the latest rejected requests.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cancel_scanner.engine.status import CHANNEL_FACTS, format_age, stage_state
from cancel_scanner.i18n import HTML_LANG, N_, local_time, tr
from cancel_scanner.i18n import render as in_language
from cancel_scanner.monitoring.snapshot import REQUEST_COLUMNS

TITLE = N_("cancel-scanner status")
# The language and the time zone of the page being rendered (render sets them, for every helper below).
_LOCALE: ContextVar[str] = ContextVar("locale", default="en")
_ZONE: ContextVar[str] = ContextVar("zone", default="UTC")


def _t(message: str, **values: Any) -> str:
    """A marked message in the page's language, its values put in (not escaped: the caller escapes)."""
    return tr(_LOCALE.get())(message).format(**values)


def _said(tag: str, message: str, **values: Any) -> str:
    """``<tag>`` around a marked message in the page's language, escaped."""
    return f"<{tag}>{_e(_t(message, **values))}</{tag}>"


def _cols(*names: str) -> tuple[str, ...]:
    return tuple(_t(n) for n in names)


FAILED_COLUMNS = ("id", "order_id", "attempts", "last_error", "updated_at")
FLAG_COLUMNS = ("attempts", "last_error")  # a goods_order2 stage's carry its prefix: stock_attempts, close_last_error
ABNORMAL_COLUMNS = ("id", "order_id", "out_refund_no", "refund_amount", "submitted_at")
FACT_COLUMNS = ("stage", "row_id", "fact", "number", "detail", "reason", "last_seen_at")
REJECTED_COLUMNS = REQUEST_COLUMNS  # what the snapshot reads of a rejected request, all shown
CSS = """
body{font:14px/1.4 monospace;margin:1em 2em;color:#222;background:#fff}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td{max-width:40em;overflow-wrap:anywhere}th{background:#f0f0f0}td.n{text-align:right}
tr.down td,tr.firing td{background:#fde2e2}.warn{background:#fde2e2;border:1px solid #c00;padding:.4em .8em;font-weight:bold}
.muted{color:#777}
"""


@dataclass(frozen=True)
class PageView:
    snapshot: Any  # the watcher's latest Snapshot, or None before the first reading
    refresh_seconds: float
    host: str
    now: float  # wall clock, epoch seconds
    last_error: str | None = None  # why the latest reading failed
    alerts: Sequence[Any] = ()  # alert messages, newest last
    firing: Sequence[tuple[str, str]] = ()  # (rule, subject) firing now
    extra: dict[str, Any] = field(default_factory=dict)
    locale: str = "en"  # what the page's words are in (the daemon passes config.locale)
    timezone: str = "UTC"  # the clock its times are shown in (the daemon passes config.display_timezone)


def _e(value: Any) -> str:
    """A value as escaped text; datetimes to the second, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        zone = _ZONE.get()  # stored UTC, shown on the reader's clock (as stored on UTC's)
        value = value.isoformat(sep=" ", timespec="seconds") if zone == "UTC" else local_time(value, zone)
    return html.escape(str(value), quote=True)


def yuan(fen: Any) -> str:
    """12345 -> "123.45", in integers: a float would round some amounts a fen off."""
    if fen is None:
        return ""
    if isinstance(fen, bool) or not isinstance(fen, int):
        try:
            fen = int(str(fen))  # an integer column may come back as text or Decimal; "1.5" is no amount
        except ValueError:
            return str(fen)  # not an amount: shown as it is (escaped by the caller)
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole}.{cents:02d}"


def _wall(epoch: float) -> str:
    return local_time(epoch, _ZONE.get())


def _table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    table_id: str | None = None,
    row_class: Callable[[int], str | None] = lambda _i: None,
    numeric: Sequence[str] = (),
) -> str:
    """A table of already-raw values: every cell is escaped here. ``numeric`` columns align right."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cls = row_class(i)
        cells = "".join(
            f'<td class="n">{_e(v)}</td>' if col in numeric else f"<td>{_e(v)}</td>" for col, v in zip(columns, row)
        )
        body.append(f'<tr class="{_e(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _more(count: int, rows: Sequence[Any]) -> str:
    """Listings are bounded (snapshot.LIST_LIMIT): say so when the count is larger than the list."""
    return _e(_t(N_("; the first {n} shown"), n=len(rows))) if count > len(rows) else ""


def _none(what: str = N_("none")) -> str:
    return f'<p class="muted">{_e(_t(what))}</p>'


def _listing_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], shown: Mapping[str, Callable[[Any], Any]] | None = None
) -> list[list[Any]]:
    """The listed rows' ``columns`` in order, each through its ``shown`` function if it has one."""
    shown = shown or {}
    return [[shown.get(c, lambda v: v)(row.get(c)) for c in columns] for row in rows]


def _unprefixed(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A failed row with its flag columns under their plain names, whatever the stage's prefix."""
    out = dict(row)
    for name in FLAG_COLUMNS:
        if name not in out:
            out[name] = next((v for k, v in row.items() if k.endswith(f"_{name}")), None)
    return out


def _header(view: PageView) -> str:
    snap = view.snapshot
    parts = [_said("h1", N_("cancel-scanner on {host}"), host=view.host)]
    if snap is None:
        cause = _t(N_("the database could not be read: {error}; "), error=view.last_error) if view.last_error else ""
        nothing = _t(N_("no reading yet"))
        parts.append(f'<p class="warn">{_e(cause)}{_e(nothing)}</p>')
        return "".join(parts)
    age = max(0, round(view.now - snap.taken_at))
    if view.last_error:
        said = _t(
            N_("the database could not be read: {error}; figures below are {age} s old"), error=view.last_error, age=age
        )
        parts.append(f'<p class="warn">{_e(said)}</p>')
    daemons = ", ".join(snap.status.daemons) or _t(N_("none (no daemon has beaten within takeover_seconds)"))
    taken = _t(
        N_("snapshot taken {age} s ago ({at}); refreshes every {refresh} s"),
        age=age,
        at=_wall(snap.taken_at),
        refresh=_refresh(view),
    )
    running = _t(N_("running daemons: {daemons}"), daemons=daemons)
    parts.append(f"<p>{_e(taken)}<br>{_e(running)}</p>")
    return "".join(parts)


def _stages(snap: Any) -> str:
    stages = snap.status.stages
    rows = [
        [
            s.stage,
            s.pending,
            s.waiting,
            s.failed,
            s.done_by_daemons,
            format_age(s.oldest_pending_seconds),
            stage_state(s, _LOCALE.get()),
        ]
        for s in stages
    ]
    columns = _cols(
        N_("stage"),
        N_("pending"),
        N_("waiting"),
        N_("failed"),
        N_("done by running daemons"),
        N_("oldest pending"),
        N_("state"),
    )
    table = _table(
        columns, rows, table_id="stages", row_class=lambda i: "down" if stages[i].down else None, numeric=columns[1:5]
    )
    return _said("h2", N_("Stages")) + table


def _down(snap: Any) -> str:
    rows = [
        [s.stage, d.daemon, format_age(d.seconds), d.reason or _t(N_("failing"))]
        for s in snap.status.down
        for d in s.down
    ]
    columns = _cols(N_("stage"), N_("daemon"), N_("for"), N_("reason"))
    body = _table(columns, rows, table_id="down") if rows else _none()
    return _said("h2", N_("Stages down")) + body


def _alerts(view: PageView) -> str:
    firing = _table(_cols(N_("rule"), N_("subject")), view.firing, table_id="firing") if view.firing else _none()
    recent = list(reversed(view.alerts))
    rows = [[a.at, a.state, a.rule, a.stage, in_language(a.summary, _LOCALE.get())] for a in recent]
    history = (
        _table(
            _cols(N_("time"), N_("state"), N_("rule"), N_("stage"), N_("summary")),
            rows,
            table_id="alerts",
            row_class=lambda i: "firing" if recent[i].state == "firing" else None,
        )
        if rows
        else _none(N_("no alert message since this daemon started"))
    )
    return _said("h2", N_("Alerts firing now")) + firing + _said("h2", N_("Recent alert messages")) + history


def _abnormal(snap: Any) -> str:
    listing = snap.listing("abnormal_refunds")
    rows = listing.rows if listing else ()
    count = snap.status.abnormal_refunds
    head = _said("h2", N_("ABNORMAL refunds: {count}"), count=count)
    if not rows:
        return head + _none()
    must = _t(N_("the merchant must act (the user’s card is frozen or closed)"))
    note = f"<p>{_e(must)}{_more(count, rows)}</p>"
    amount = _t(N_("amount (yuan)"))
    table = _table(
        ("id", "order_id", "out_refund_no", amount, "submitted_at"),
        _listing_rows(rows, ABNORMAL_COLUMNS, {"refund_amount": yuan}),
        table_id="abnormal",
        numeric=(amount,),
    )
    return head + note + table


def _facts(snap: Any) -> str:
    listing = snap.listing(CHANNEL_FACTS)
    rows = listing.rows if listing else ()
    count = snap.status.channel_facts_open
    head = _said("h2", N_("Done at WeChat Pay, not recorded here yet: {count}"), count=count)
    if not rows:
        return head + _none()
    said = _t(
        N_(
            "the shop’s database refused the write (a trigger or a constraint): lift or fix the shop’s rule and"
            " the row is written by itself"
        )
    )
    note = f"<p>{_e(said)}{_more(count, rows)}</p>"
    return head + note + _table(FACT_COLUMNS, _listing_rows(rows, FACT_COLUMNS), table_id="facts")


def _failed(snap: Any) -> str:
    listings = [item for item in snap.listings if item.key.startswith("failed:") and item.rows]
    parts = [_said("h2", N_("Rows that need a person"))]
    if not listings:
        return parts[0] + _none()
    notes = dict(snap.status.failed_notes)
    for item in listings:
        stage = item.stage or item.key.removeprefix("failed:")
        note = _t(notes.get(stage, N_("failed for good: the reason is in last_error")))
        count = snap.failed(stage)
        parts.append(f"<h3>{_e(stage)}: {_e(count)} {_e(note)}{_more(count, item.rows)}</h3>")
        rows = [_unprefixed(row) for row in item.rows]
        parts.append(_table(FAILED_COLUMNS, _listing_rows(rows, FAILED_COLUMNS), numeric=("attempts",)))
    return "".join(parts)


def _rejected(snap: Any) -> str:
    listing = snap.listing("rejected")
    rows = listing.rows if listing else ()
    body = _table(REJECTED_COLUMNS, _listing_rows(rows, REJECTED_COLUMNS), table_id="rejected") if rows else _none()
    return _said("h2", N_("Latest rejected requests")) + body


def _refresh(view: PageView) -> int:
    return max(1, math.ceil(view.refresh_seconds))


def render(view: PageView) -> str:
    shown, zone = _LOCALE.set(view.locale), _ZONE.set(view.timezone)
    try:
        return _render(view)
    finally:
        _LOCALE.reset(shown)
        _ZONE.reset(zone)


def _render(view: PageView) -> str:
    sections = [_header(view)]
    if view.snapshot is not None:
        sections += [_stages(view.snapshot), _down(view.snapshot)]
    sections.append(_alerts(view))
    if view.snapshot is not None:
        sections += [_abnormal(view.snapshot), _facts(view.snapshot), _failed(view.snapshot), _rejected(view.snapshot)]
    return (
        f'<!doctype html><html lang="{HTML_LANG[view.locale]}"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{_refresh(view)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(_t(TITLE))}</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    )
