"""One module per stage of the flow, the shop SQL they share (shop.py), and the registry: the stages in flow order."""

from __future__ import annotations

from engine.stage import StageRegistry
from scanners.decrement_sales import DecrementSales
from scanners.intake import Intake
from scanners.poll_refund import PollRefund
from scanners.restore_stock import RestoreStock
from scanners.submit_refund import SubmitRefund
from scanners.sync_result import SyncResult

REGISTRY = StageRegistry([Intake, SubmitRefund, PollRefund, SyncResult, RestoreStock, DecrementSales])


def build_stages(config) -> dict:
    """Every stage, in flow order, configured from ``config``."""
    return REGISTRY.build(config)
