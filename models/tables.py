"""The five tables of the contract (docs/contract.md), typed.

No behaviour lives here. Column comments are what a DBA reads; index names are
stable because ``sql/schema.sql`` and the drift test name them too.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import CheckConstraint, Index, MetaData, String, Table, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cancel_scanner.models.types import Flag, Id, RefId, SignedInt, Timestamp3, UInt, now3

NAMING = {
    "ix": "idx_%(table_name)s_%(column_0_name)s",
    "uq": "uk_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # SQLAlchemy types __table__ as a FromClause (a class may be mapped to a select);
    # every class here is mapped to a Table, as its maintainers suggest saying so.
    __table__: ClassVar[Table]


def _count(kind, comment: str, *, archived: bool = False) -> Mapped[int]:
    """A counter from 0 (units, fen, attempts); ``archived``: added after its table's archive existed, so
    the archive keeps its default."""
    return mapped_column(
        kind,
        nullable=False,
        default=0,
        server_default=text("0"),
        comment=comment,
        info={"archive_default": True} if archived else {},
    )


def _flag(comment: str, *, archived: bool = False) -> Mapped[int]:
    """A 0/1 column: a counter of the Flag type."""
    return _count(Flag, comment, archived=archived)


def _channel(comment: str) -> Mapped[str]:
    return mapped_column(
        String(16),
        nullable=False,
        default="wechat",
        server_default=text("'wechat'"),
        comment=comment,
        info={"archive_default": True},
    )


def _created() -> Mapped[datetime]:
    return mapped_column(Timestamp3, nullable=False, server_default=now3(), comment="row inserted (UTC)")


def _updated() -> Mapped[datetime]:
    return mapped_column(
        Timestamp3, nullable=False, server_default=now3(), onupdate=now3(), comment="row last changed (UTC)"
    )


class Goods(Base):
    __tablename__ = "goods"
    __table_args__ = (
        CheckConstraint("stock >= 0", name="stock_not_negative"),
        CheckConstraint("sales >= 0", name="sales_not_negative"),
        {"comment": "Sellable goods; stock and sales are unsigned, the last guard against overselling."},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    stock: Mapped[int] = mapped_column(UInt, nullable=False, default=0, server_default=text("0"))
    sales: Mapped[int] = mapped_column(UInt, nullable=False, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class GoodsOrder(Base):
    __tablename__ = "goods_order2"
    __table_args__ = (
        UniqueConstraint("order_no", name="uk_goods_order2_order_no"),
        # Stage 5 (restore_stock) polls: stock_scanned=0 AND stock_success=0 AND order_status='CANCELLED' AND ...;
        # `status` counts done/failed on the first two columns alone.
        Index(
            "idx_goods_order2_stock_pending",
            "stock_scanned",
            "stock_success",
            "order_status",
            "refund_status",
            "is_deleted",
        ),
        # Stage 6 (decrement_sales) polls: sales_scanned=0 AND sales_success=0 AND order_status='CANCELLED' AND ...
        Index(
            "idx_goods_order2_sales_pending",
            "sales_scanned",
            "sales_success",
            "order_status",
            "refund_status",
            "is_deleted",
        ),
        Index("idx_goods_order2_goods_id", "goods_id"),
        # Stage 7 (close_unpaid) polls two ranges of this index: a requested cancel (cancel_requested_at IS NOT
        # NULL), or nobody asked and the order is UNPAID since before the payment timeout (created_at <= cutoff).
        Index(
            "idx_goods_order2_close_pending",
            "close_scanned",
            "close_success",
            "cancel_requested_at",
            "order_status",
            "created_at",
        ),
        # The reaper releases a dead process's close leases by owner.
        Index("idx_goods_order2_close_lease_owner", "close_lease_owner"),
        # The ship timeout (jobs.intake.ship_timeout_hours, off by default) finds PAID orders paid before a cutoff.
        Index("idx_goods_order2_ship_due", "order_status", "paid_at"),
        {"comment": "One goods line per order. Flags: X_scanned/X_success 0/0 pending, 1/1 done, 1/0 failed."},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(String(32), nullable=False, comment="sent to WeChat as out_trade_no")
    user_id: Mapped[int] = mapped_column(RefId, nullable=False)
    merchant_id: Mapped[int] = mapped_column(RefId, nullable=False)
    goods_id: Mapped[int] = mapped_column(RefId, nullable=False)
    quantity: Mapped[int] = mapped_column(UInt, nullable=False)
    total_amount: Mapped[int] = mapped_column(UInt, nullable=False, comment="what the user paid, in fen")
    pay_status: Mapped[int] = mapped_column(
        Flag, nullable=False, default=0, server_default=text("0"), comment="0 unpaid, 1 paid"
    )
    transaction_id: Mapped[str | None] = mapped_column(String(32), comment="WeChat Pay transaction id of the payment")
    paid_at: Mapped[datetime | None] = mapped_column(Timestamp3)
    order_status: Mapped[str] = mapped_column(
        String(16),
        nullable=False,
        default="UNPAID",
        server_default=text("'UNPAID'"),
        comment="UNPAID|PAID|SHIPPED|COMPLETED|CANCELLED",
    )
    cancel_source: Mapped[str | None] = mapped_column(
        String(16),
        comment="MERCHANT|USER|TIMEOUT|SHIP_TIMEOUT: who asked (set with the request; TIMEOUT when nobody did and it"
        " was not paid in time, SHIP_TIMEOUT when it was not shipped in time)",
    )
    refund_status: Mapped[str] = mapped_column(
        String(16),
        nullable=False,
        default="NONE",
        server_default=text("'NONE'"),
        comment="NONE|REFUNDING|REFUNDED|FAILED",
    )
    wx_progress_scanned: Mapped[int] = _flag("1 once the refund's final WeChat status was written to this order")
    stock_scanned: Mapped[int] = _flag("restore_stock: 0 pending, 1 finished (see stock_success)")
    stock_success: Mapped[int] = _flag("restore_stock: 1 stock given back exactly once; 0 with stock_scanned=1 failed")
    sales_scanned: Mapped[int] = _flag("decrement_sales: 0 pending, 1 finished (see sales_success)")
    sales_success: Mapped[int] = _flag(
        "decrement_sales: 1 sales decremented exactly once; 0 with sales_scanned=1 failed"
    )
    is_deleted: Mapped[int] = _flag("1 soft-deleted: never cancelled, never touched by the scanner")
    cancelled_at: Mapped[datetime | None] = mapped_column(Timestamp3)
    refunded_at: Mapped[datetime | None] = mapped_column(Timestamp3)
    stock_attempts: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default=text("0"), comment="restore_stock: failed tries so far"
    )
    stock_next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="restore_stock: not retried before this time (UTC)"
    )
    stock_last_error: Mapped[str | None] = mapped_column(String(255), comment="restore_stock: why the last try failed")
    sales_attempts: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default=text("0"), comment="decrement_sales: failed tries so far"
    )
    sales_next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="decrement_sales: not retried before this time (UTC)"
    )
    sales_last_error: Mapped[str | None] = mapped_column(
        String(255), comment="decrement_sales: why the last try failed"
    )
    cancel_requested_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="intake: a cancel of this unpaid order was accepted; close_unpaid settles its payment first"
    )
    close_scanned: Mapped[int] = _flag("close_unpaid: 0 pending, 1 finished (see close_success)")
    close_success: Mapped[int] = _flag(
        "close_unpaid: 1 settled with WeChat (payment closed, or a lost payment booked); 0 with close_scanned=1 failed"
    )
    close_attempts: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default=text("0"), comment="close_unpaid: failed tries so far"
    )
    close_next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="close_unpaid: not tried before this time (UTC)"
    )
    close_last_error: Mapped[str | None] = mapped_column(String(255), comment="close_unpaid: why the last try failed")
    close_lease_owner: Mapped[str | None] = mapped_column(
        String(64), comment="close_unpaid: daemon calling WeChat for this order now"
    )
    close_lease_until: Mapped[datetime | None] = mapped_column(Timestamp3, comment="close_unpaid: lease expiry (UTC)")
    channel: Mapped[str] = _channel("the payment channel the order was paid (or is to be paid) through: wechat, ...")
    cancelled_quantity: Mapped[int] = _count(
        UInt,
        "intake: units cancelled so far, partial cancels and the cancel of the rest (0 for cancels before schema 8)",
    )
    parts_quantity: Mapped[int] = _count(
        UInt,
        "intake: units cancelled by partial cancels while the order went on (their stock and sales move with their"
        " refunds: part_goods; restore_stock and decrement_sales move the rest)",
    )
    refunded_amount: Mapped[int] = _count(
        UInt,
        "sync_result: fen WeChat confirmed refunded so far, every refund of the order (0 for refunds before schema 8)",
    )
    refund_turn_at: Mapped[datetime | None] = mapped_column(
        Timestamp3,
        comment="submit_refund: when a refund of this payment with others last went out (the next waits"
        " refund_spacing_seconds)",
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class OrderOpRequest(Base):
    __tablename__ = "req_order_ops"
    __table_args__ = (
        # Stage 1 (intake) polls: scanned=0 AND success=0 ORDER BY id
        Index("idx_req_order_ops_pending", "scanned", "success", "id"),
        Index("idx_req_order_ops_order_id", "order_id"),
        {"comment": "Merchants' requests; their tools insert order_id, op_type, operator, reason only."},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(RefId, nullable=False, comment="goods_order2.id")
    op_type: Mapped[str] = mapped_column(
        String(32),
        nullable=False,
        comment="MERCHANT_CANCEL|USER_CANCEL|SHIP_TIMEOUT_CANCEL (the ship timeout's own)",
    )
    operator: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(String(255))
    quantity: Mapped[int | None] = mapped_column(
        SignedInt, comment="units to cancel; NULL: every unit not yet cancelled (the whole order)"
    )
    scanned: Mapped[int] = _flag("intake: 0 pending, 1 handled (see success and result_code)")
    success: Mapped[int] = _flag("intake: 1 accepted (result_code OK); 0 with scanned=1 rejected or failed")
    result_code: Mapped[str | None] = mapped_column(String(32), comment="OK or a stable rejection code")
    result_msg: Mapped[str | None] = mapped_column(String(255), comment="what happened, for the merchant")
    scanned_at: Mapped[datetime | None] = mapped_column(Timestamp3)
    attempts: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default=text("0"), comment="intake: failed tries so far"
    )
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="intake: not retried before this time (UTC)"
    )
    last_error: Mapped[str | None] = mapped_column(String(255), comment="intake: why the last try failed")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class RefundOrder(Base):
    __tablename__ = "refund_order"
    __table_args__ = (
        UniqueConstraint("out_refund_no", name="uk_refund_order_out_refund_no"),
        # An order's refunds are numbered 1, 2, ... under its row lock (intake, reissue): never two of one number.
        UniqueConstraint("order_id", "refund_seq", name="uk_refund_order_order_seq"),
        # Stage 2 (submit_refund) polls: submit_scanned=0 AND submit_success=0 AND next_attempt_at<=now
        Index("idx_refund_order_submit_pending", "submit_scanned", "submit_success", "next_attempt_at"),
        # Stage 3 (poll_refund) polls: submit_success=1 AND progress_scanned=0 AND progress_success=0 AND next_attempt_at<=now
        Index(
            "idx_refund_order_poll_pending", "submit_success", "progress_scanned", "progress_success", "next_attempt_at"
        ),
        # Stage 4 (sync_result) polls: progress_scanned=1 AND sync_scanned=0 AND sync_success=0
        Index("idx_refund_order_sync_pending", "progress_scanned", "sync_scanned", "sync_success"),
        # The reaper releases a dead process's leases by owner.
        Index("idx_refund_order_lease_owner", "lease_owner"),
        # reconcile finds the refunds WeChat accepted on a day.
        Index("idx_refund_order_submitted_at", "submitted_at"),
        # part_goods polls: part=1 AND sync_success=1 AND goods_scanned=0 AND goods_success=0
        Index("idx_refund_order_goods_pending", "part", "sync_success", "goods_scanned", "goods_success"),
        CheckConstraint("refund_amount <= total_amount", name="refund_within_total"),
        {"comment": "One row per refund sent to WeChat Pay; out_refund_no is fixed before the first call."},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(RefId, nullable=False, comment="goods_order2.id")
    req_id: Mapped[int | None] = mapped_column(RefId, comment="req_order_ops.id that caused it")
    refund_seq: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=1, server_default=text("1"), comment="1 for the first refund of an order"
    )
    out_refund_no: Mapped[str] = mapped_column(String(64), nullable=False, comment="our refund number, [0-9A-Za-z_-]")
    out_trade_no: Mapped[str] = mapped_column(String(32), nullable=False, comment="goods_order2.order_no")
    transaction_id: Mapped[str | None] = mapped_column(String(32))
    refund_amount: Mapped[int] = mapped_column(UInt, nullable=False, comment="fen")
    total_amount: Mapped[int] = mapped_column(UInt, nullable=False, comment="fen paid")
    reason: Mapped[str | None] = mapped_column(String(80))
    submit_scanned: Mapped[int] = _flag("submit_refund: 0 pending, 1 finished (see submit_success)")
    submit_success: Mapped[int] = _flag("submit_refund: 1 WeChat accepted the refund; 0 with submit_scanned=1 rejected")
    wx_refund_id: Mapped[str | None] = mapped_column(String(64), comment="WeChat's refund_id")
    wx_status: Mapped[str | None] = mapped_column(String(16), comment="PROCESSING|SUCCESS|CLOSED|ABNORMAL")
    progress_scanned: Mapped[int] = _flag("poll_refund: 1 once WeChat said SUCCESS or CLOSED")
    progress_success: Mapped[int] = _flag("poll_refund: 1 SUCCESS (money returned), 0 with progress_scanned=1 CLOSED")
    sync_scanned: Mapped[int] = _flag("sync_result: 1 once the result was written to goods_order2")
    sync_success: Mapped[int] = _flag("sync_result: 1 written exactly once; 0 with sync_scanned=1 failed")
    attempts: Mapped[int] = mapped_column(
        SignedInt, nullable=False, default=0, server_default=text("0"), comment="failed tries of the current stage"
    )
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="current stage: not tried or polled before this time (UTC)"
    )
    last_error: Mapped[str | None] = mapped_column(String(255), comment="why the last try failed, CODE: message")
    lease_owner: Mapped[str | None] = mapped_column(String(64), comment="daemon calling WeChat for this row now")
    lease_until: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="lease expiry (UTC); then others may take over"
    )
    submit_sent: Mapped[int] = _flag(
        "submit_refund: 1 once an apply call may have reached WeChat; a later refusal is then checked by a query"
    )
    submitted_at: Mapped[datetime | None] = mapped_column(Timestamp3, comment="when WeChat accepted the refund")
    success_time: Mapped[datetime | None] = mapped_column(Timestamp3, comment="WeChat's success_time (UTC)")
    channel: Mapped[str] = _channel("the payment channel the refund is sent through: the order's")
    quantity: Mapped[int | None] = mapped_column(
        UInt, comment="units it pays back; NULL: a refund from before schema 8 (the whole order)"
    )
    part: Mapped[int] = _flag(
        "1: the refund of a partial cancel, the order goes on; 0: the refund of the order's cancel", archived=True
    )
    applied_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="submit_refund: when it was last leased to go out to the payment channel"
    )
    goods_scanned: Mapped[int] = _flag(
        "part_goods: 0 pending, 1 finished (see goods_success); a partial cancel's refund only", archived=True
    )
    goods_success: Mapped[int] = _flag(
        "part_goods: 1 its units back in stock and off sales exactly once; 0 with goods_scanned=1 failed", archived=True
    )
    goods_attempts: Mapped[int] = _count(SignedInt, "part_goods: failed tries so far", archived=True)
    goods_next_attempt_at: Mapped[datetime | None] = mapped_column(
        Timestamp3, comment="part_goods: not retried before this time (UTC)"
    )
    goods_last_error: Mapped[str | None] = mapped_column(String(255), comment="part_goods: why the last try failed")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class OrderOpLog(Base):
    __tablename__ = "goods_order2_oplog"
    __table_args__ = (
        # Each event at most once per order, enforced by the database itself.
        UniqueConstraint("order_id", "event", name="uk_goods_order2_oplog_order_event"),
        {"comment": "What the scanner did to each order, one row per event."},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(RefId, nullable=False, comment="goods_order2.id")
    event: Mapped[str] = mapped_column(
        String(32),
        nullable=False,
        comment=(
            "CANCELLED|REFUND_SUBMITTED|REFUND_SUCCEEDED|REFUND_FAILED|STOCK_RESTORED|SALES_DECREMENTED|PAYMENT_FOUND|PAYMENT_CLOSED"
            "|REFUND_REISSUED|ABNORMAL_REFUND_APPLIED|ORPHAN_PAYMENT_REFUND; a refund after the first adds #N (REFUND_SUBMITTED#2)"
        ),
    )
    detail: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class ScannerProcess(Base):
    __tablename__ = "cancel_scanner_process"
    __table_args__ = (
        UniqueConstraint("owner", name="uk_cancel_scanner_process_owner"),
        Index("idx_cancel_scanner_process_heartbeat_at", "heartbeat_at"),
        {
            "comment": "Running cancel-scanner processes and their heartbeats (database time); leases of a silent one are released."
        },
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), nullable=False, comment="the lease_owner this process writes")
    hostname: Mapped[str] = mapped_column(String(64), nullable=False)
    pid: Mapped[int] = mapped_column(SignedInt, nullable=False)
    started_at: Mapped[datetime] = mapped_column(
        Timestamp3, nullable=False, comment="registered at (database time, UTC)"
    )
    heartbeat_at: Mapped[datetime] = mapped_column(
        Timestamp3, nullable=False, comment="last heartbeat (database time, UTC); silent past takeover_seconds = dead"
    )
    report: Mapped[str | None] = mapped_column(
        String(4000),
        comment="its stages (up, or down since when and why) and rows finished since it started, JSON; read by status",
    )
    pace_group: Mapped[str | None] = mapped_column(
        String(64),
        comment="the merchant (mchid) whose WeChat QPS it shares with the other live processes of it; NULL: calls nothing paced",
    )
    pace_limits: Mapped[str | None] = mapped_column(
        String(255),
        comment="the per-merchant QPS it was configured with, endpoint=qps;...: processes of one merchant pace at the strictest",
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class SchemaVersion(Base):
    __tablename__ = "cancel_scanner_schema"
    __table_args__ = (
        {"comment": "Schema versions; the daemon refuses to start on a database behind or ahead of its own."},
    )

    version: Mapped[int] = mapped_column(
        SignedInt,
        primary_key=True,
        autoincrement=False,
        comment="a schema version this database reached; the highest is its version",
    )
    applied_by: Mapped[str] = mapped_column(
        String(64),
        nullable=False,
        comment="what brought it there: schema.sql, initdb or migrate, and the cancel-scanner version",
    )
    applied_at: Mapped[datetime] = mapped_column(
        Timestamp3, nullable=False, server_default=now3(), comment="when (UTC)"
    )


goods = Goods.__table__
goods_order2 = GoodsOrder.__table__
req_order_ops = OrderOpRequest.__table__
refund_order = RefundOrder.__table__
oplog = OrderOpLog.__table__
scanner_process = ScannerProcess.__table__
schema_version = SchemaVersion.__table__
metadata = Base.metadata
