"""One module per stage of the flow, the shop SQL they share (shop.py), and the registry: the stages in flow order."""

from __future__ import annotations

from cancel_scanner.engine.stage import StageRegistry
from cancel_scanner.scanners.close_unpaid import CloseUnpaid
from cancel_scanner.scanners.decrement_sales import DecrementSales
from cancel_scanner.scanners.intake import Intake
from cancel_scanner.scanners.part_goods import PartGoods
from cancel_scanner.scanners.poll_refund import PollRefund
from cancel_scanner.scanners.restore_stock import RestoreStock
from cancel_scanner.scanners.submit_refund import SubmitRefund
from cancel_scanner.scanners.sync_result import SyncResult

REGISTRY = StageRegistry(
    [Intake, CloseUnpaid, SubmitRefund, PollRefund, SyncResult, RestoreStock, DecrementSales, PartGoods]
)


def build_stages(config) -> dict:
    """Every stage, in flow order, configured from ``config``."""
    return REGISTRY.build(config)
