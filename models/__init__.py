"""Typed SQLAlchemy 2.0 tables of the contract; ``sql/schema.sql`` is their MySQL twin."""

from cancel_scanner.models.tables import (
    Base,
    Goods,
    GoodsOrder,
    OrderOpLog,
    OrderOpRequest,
    RefundOrder,
    ScannerProcess,
    SchemaVersion,
    goods,
    goods_order2,
    metadata,
    oplog,
    refund_order,
    req_order_ops,
    scanner_process,
    schema_version,
)

__all__ = [
    "Base",
    "Goods",
    "GoodsOrder",
    "OrderOpLog",
    "OrderOpRequest",
    "RefundOrder",
    "ScannerProcess",
    "SchemaVersion",
    "goods",
    "goods_order2",
    "metadata",
    "oplog",
    "refund_order",
    "req_order_ops",
    "scanner_process",
    "schema_version",
]
