"""Tables of the operator's tools: reconciliation results, and the archives `prune` moves finished rows to.

The archives hold the live tables' columns, typed the same, without their defaults (a row arrives
whole) or their polling indexes (nothing polls an archive), plus ``archived_at``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Date, DefaultClause, Index, String, Table, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cancel_scanner.models.tables import Base, _created, _updated, oplog, refund_order, req_order_ops
from cancel_scanner.models.types import Id, SignedInt, Timestamp3, now3

DIFF_KINDS = (
    "MISSING_HERE",
    "MISSING_AT_WECHAT",
    "AMOUNT_DIFFERS",
    "STATUS_DIFFERS",
    "ORPHAN_PAYMENT",
    "DUPLICATE_LINE",
    "UNBOOKED_PAYMENT",
)


class ReconcileDiff(Base):
    __tablename__ = "reconcile_diff"
    __table_args__ = (
        Index("idx_reconcile_diff_bill_date", "bill_date", "kind"),
        {
            "comment": "One row per difference between WeChat Pay's daily bill and our tables; a day reconciled again replaces its rows."
        },
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    bill_date: Mapped[date] = mapped_column(Date, nullable=False, comment="the bill's day (Beijing time)")
    kind: Mapped[str] = mapped_column(String(32), nullable=False, comment="|".join(DIFF_KINDS))
    out_trade_no: Mapped[str] = mapped_column(String(32), nullable=False, comment="goods_order2.order_no")
    out_refund_no: Mapped[str | None] = mapped_column(String(64), comment="refund_order.out_refund_no, for a refund")
    ours_fen: Mapped[int | None] = mapped_column(BigInteger, comment="our amount (fen)")
    theirs_fen: Mapped[int | None] = mapped_column(BigInteger, comment="the bill's amount (fen)")
    ours_status: Mapped[str | None] = mapped_column(String(16))
    theirs_status: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(String(255), nullable=False, comment="what differs, for a person")
    created_at: Mapped[datetime] = _created()


class OperatorAction(Base):
    __tablename__ = "operator_action"
    __table_args__ = (
        Index("idx_operator_action_started_at", "started_at"),
        Index("idx_operator_action_command", "command", "started_at"),
        {
            "comment": "Every operator action: the command, its arguments (no secret), who, where, when, and what"
            " it changed."
        },
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    command: Mapped[str] = mapped_column(
        String(32), nullable=False, comment="requeue|reissue|abnormal-refund|reconcile|prune|migrate"
    )
    arguments: Mapped[str | None] = mapped_column(
        String(1000), comment="its arguments, name=value, secrets and bank details never written"
    )
    os_user: Mapped[str] = mapped_column(String(64), nullable=False, comment="the operating system user who ran it")
    host: Mapped[str] = mapped_column(String(64), nullable=False, comment="the host it ran on")
    operator: Mapped[str | None] = mapped_column(String(64), comment="--operator NAME, when given")
    started_at: Mapped[datetime] = mapped_column(Timestamp3, nullable=False, comment="when it started (UTC)")
    ended_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="when it ended (UTC); NULL: still running, or killed"
    )
    outcome: Mapped[str | None] = mapped_column(String(16), comment="ok|refused|failed|interrupted (exit 0, 2, other)")
    exit_code: Mapped[int | None] = mapped_column(SignedInt)
    changed: Mapped[str | None] = mapped_column(String(1000), comment="what it changed, in a line")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ReconcileRun(Base):
    __tablename__ = "reconcile_run"
    __table_args__ = ({"comment": "One row per reconciled day: how the last reconciliation of that day ended."},)

    bill_date: Mapped[date] = mapped_column(Date, primary_key=True, comment="the bill's day (Beijing time)")
    state: Mapped[str] = mapped_column(String(16), nullable=False, comment="CLEAN|DIFFERS|NO_BILL|WAITING|FAILED")
    bill_rows: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default="0", comment="detail rows in the bill"
    )
    diffs: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default="0", comment="rows in reconcile_diff for the day"
    )
    attempts: Mapped[int] = mapped_column(SignedInt, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(
        String(255), comment="why the last try failed (STATEMENT_CREATING, a bad SHA1, ...)"
    )
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp3, comment="when the comparison was written (UTC)")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ChannelFact(Base):
    __tablename__ = "channel_fact"
    __table_args__ = (
        UniqueConstraint("stage", "row_id", name="uk_channel_fact_stage_row"),
        Index("idx_channel_fact_open", "resolved_at", "last_seen_at"),
        {
            "comment": "What a payment channel did for a row whose write-back here failed (a shop trigger, a constraint):"
            " kept on a table of ours until the row's stage records it."
        },
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    stage: Mapped[str] = mapped_column(String(32), nullable=False, comment="the gateway stage that called")
    row_id: Mapped[int] = mapped_column(BigInteger, nullable=False, comment="the id of that stage's row")
    order_id: Mapped[int | None] = mapped_column(BigInteger, comment="goods_order2.id")
    number: Mapped[str] = mapped_column(String(64), nullable=False, comment="out_trade_no or out_refund_no")
    fact: Mapped[str] = mapped_column(
        String(32), nullable=False, comment="PAYMENT_CLOSED|PAYMENT_PAID|REFUND_ACCEPTED|REFUND_SUCCESS|REFUND_CLOSED"
    )
    detail: Mapped[str | None] = mapped_column(String(255), comment="the channel's ids and amounts, for a person")
    reason: Mapped[str] = mapped_column(String(255), nullable=False, comment="why the write here failed, last time")
    times_seen: Mapped[int] = mapped_column(SignedInt, nullable=False, default=1, server_default="1")
    first_seen_at: Mapped[datetime] = mapped_column(Timestamp3, nullable=False, comment="database time, UTC")
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp3, nullable=False, comment="database time, UTC")
    resolved_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="when the stage recorded it (UTC); NULL: still open"
    )


channel_fact = ChannelFact.__table__


def _archive_default(column: Column[Any]) -> Any:
    """The constant server default an archive column keeps (``info={"archive_default": True}``), else None."""
    if not column.info.get("archive_default") or column.server_default is None:
        return None
    # A server_default given as text() or a string, as every archive_default column's is, is a DefaultClause.
    assert isinstance(column.server_default, DefaultClause), f"{column.name}: archive_default needs a DefaultClause"
    return column.server_default.arg


def _archive(live: Table, comment: str, *keys) -> Table:
    """The archive twin of ``live``: its columns and types, its primary key without auto-increment. A
    column the live table gained after its archive existed keeps its constant default
    (``info={"archive_default": True}``), so that migrate can add it to an archive that has rows."""
    columns = [
        Column(
            c.name,
            BigInteger() if c.primary_key else c.type,
            primary_key=c.primary_key,
            autoincrement=False,
            nullable=c.nullable,
            server_default=_archive_default(c),
        )
        for c in live.columns
    ]
    archived = Column("archived_at", Timestamp3, nullable=False, server_default=now3(), comment="moved here (UTC)")
    return Table(f"{live.name}_archive", Base.metadata, *columns, archived, *keys, comment=comment)


req_order_ops_archive = _archive(
    req_order_ops,
    "req_order_ops rows pruned from the live table: finished, older than prune's cutoff.",
    Index("idx_req_order_ops_archive_order_id", "order_id"),
)
refund_order_archive = _archive(
    refund_order,
    "refund_order rows pruned from the live table: refunded and synced, older than prune's cutoff.",
    UniqueConstraint("out_refund_no", name="uk_refund_order_archive_out_refund_no"),
    Index("idx_refund_order_archive_order_id", "order_id"),
    Index("idx_refund_order_archive_submitted_at", "submitted_at"),  # reconcile reads a day of it
)
oplog_archive = _archive(
    oplog,
    "goods_order2_oplog rows pruned from the live table, older than prune's cutoff.",
    UniqueConstraint("order_id", "event", name="uk_goods_order2_oplog_archive_order_event"),
)
reconcile_diff = ReconcileDiff.__table__
reconcile_run = ReconcileRun.__table__
operator_action = OperatorAction.__table__
ARCHIVES = {req_order_ops: req_order_ops_archive, refund_order: refund_order_archive, oplog: oplog_archive}
