"""`history ORDER`: what happened to one order, in time order, from what the tables keep (issue 28).

The order is named by its id, its ``order_no`` or one of its refunds' ``out_refund_no``. The story
reads, live tables and archives alike: the cancel requests and their answers (``req_order_ops``), the
order's events (``goods_order2_oplog``), each refund with its flags and WeChat's word
(``refund_order``), and every operator action that named the order or one of its refunds
(``operator_action``); then what is pending now and why. Not yet: every call to the channel (issue
28's call record).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, or_, select

from cancel_scanner.models import (
    goods_order2,
    operator_action,
    oplog,
    oplog_archive,
    refund_order,
    refund_order_archive,
    req_order_ops,
    req_order_ops_archive,
)


@dataclass(frozen=True)
class Event:
    at: datetime | None
    kind: str  # request | answer | event | refund | action
    text: str
    row: dict = field(default_factory=dict, compare=False)


@dataclass
class Story:
    order: dict
    events: list[Event]
    pending: list[str]


def find_order(conn: Connection, ref: str) -> dict | None:
    """The order ``ref`` names: an id, an order_no, or an out_refund_no of one of its refunds."""
    o = goods_order2.c
    if ref.isdigit():
        found = conn.execute(select(goods_order2).where(o.id == int(ref))).mappings().first()
        if found is not None:
            return dict(found)
    found = conn.execute(select(goods_order2).where(o.order_no == ref)).mappings().first()
    if found is not None:
        return dict(found)
    for table in (refund_order, refund_order_archive):
        order_id = conn.execute(select(table.c.order_id).where(table.c.out_refund_no == ref)).scalar()
        if order_id is not None:
            row = conn.execute(select(goods_order2).where(o.id == order_id)).mappings().first()
            return dict(row) if row is not None else None
    return None


def story(db: Engine, ref: str) -> Story | None:
    with db.connect() as conn:
        order = find_order(conn, ref)
        if order is None:
            return None
        oid = order["id"]
        events: list[Event] = []
        for table in (req_order_ops, req_order_ops_archive):
            for req in conn.execute(select(table).where(table.c.order_id == oid)).mappings():
                asked = f"request #{req['id']} {req['op_type']} by {req['operator'] or '-'}" + (
                    f", {req['quantity']} unit(s)" if req.get("quantity") is not None else ""
                )
                events.append(Event(req["created_at"], "request", asked, dict(req)))
                if req["scanned"]:
                    events.append(
                        Event(
                            req["scanned_at"],
                            "answer",
                            f"request #{req['id']}: {req['result_code']} {req['result_msg'] or ''}",
                            dict(req),
                        )
                    )
        for table in (oplog, oplog_archive):
            for e in conn.execute(select(table).where(table.c.order_id == oid)).mappings():
                events.append(Event(e["created_at"], "event", f"{e['event']} {e['detail'] or ''}".strip(), dict(e)))
        refunds: list[dict[str, Any]] = []
        for table in (refund_order, refund_order_archive):
            refunds += [dict(r) for r in conn.execute(select(table).where(table.c.order_id == oid)).mappings()]
        for r in sorted(refunds, key=lambda x: x["refund_seq"]):
            events.append(
                Event(
                    r["created_at"],
                    "refund",
                    f"refund {r['out_refund_no']} #{r['refund_seq']}{' (part)' if r.get('part') else ''}: {r['refund_amount']}"
                    f" fen of {r['total_amount']}, WeChat {r['wx_status'] or '-'}, submit {r['submit_scanned']}/{r['submit_success']}"
                    f" progress {r['progress_scanned']}/{r['progress_success']} sync {r['sync_scanned']}/{r['sync_success']}"
                    + (f", last_error {r['last_error']}" if r["last_error"] else ""),
                    r,
                )
            )
        numbers = {str(oid)} | {str(r["id"]) for r in refunds} | {r["out_refund_no"] for r in refunds}
        a = operator_action.c
        for act in conn.execute(
            select(operator_action).where(or_(*[a.arguments.contains(n) for n in numbers]))
        ).mappings():
            if _names(act["arguments"] or "", numbers):
                who = act["operator"] or f"{act['os_user']}@{act['host']}"
                events.append(
                    Event(
                        act["started_at"],
                        "action",
                        f"{act['command']} {act['arguments']} by {who}: {act['outcome']}",
                        dict(act),
                    )
                )
    events.sort(key=lambda e: (e.at or datetime.min, e.kind))
    return Story(order, events, _pending(order, refunds))


def _names(arguments: str, numbers: set[str]) -> bool:
    """Whether an action's arguments name one of ``numbers`` as a whole value (7 is not 17)."""
    values = set(re.split(r"[ ,=]", arguments))
    return bool(values & numbers)


def _pending(order: dict, refunds: list[dict]) -> list[str]:
    said = []
    for r in refunds:
        if not r["submit_scanned"]:
            said.append(f"refund {r['out_refund_no']}: not accepted by WeChat yet ({r['last_error'] or 'due'})")
        elif r["submit_success"] and not r["progress_scanned"]:
            said.append(f"refund {r['out_refund_no']}: {r['wx_status']}, polled until it ends")
        elif r["progress_scanned"] and not r["sync_scanned"]:
            said.append(f"refund {r['out_refund_no']}: its end not written to the order yet")
        elif r.get("part") and r["progress_success"] and not r.get("goods_scanned"):
            said.append(f"refund {r['out_refund_no']}: its units not back in stock yet")
    if order["order_status"] == "CANCELLED" and order["refund_status"] in ("NONE", "REFUNDED"):
        if not order["stock_scanned"]:
            said.append("stock not given back yet")
        if order["refund_status"] == "REFUNDED" and not order["sales_scanned"]:
            said.append("sales not taken down yet")
    if order["cancel_requested_at"] is not None and not order["close_scanned"]:
        said.append("its payment is being closed at WeChat first")
    return said


def as_dict(s: Story) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else v

    return {
        "order": {k: plain(v) for k, v in s.order.items()},
        "events": [{"at": plain(e.at), "kind": e.kind, "text": e.text} for e in s.events],
        "pending": s.pending,
    }
