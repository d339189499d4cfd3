"""One module per stage of the flow, in flow order. Nothing else lives here."""

from __future__ import annotations

from engine.config import Config
from scanners.decrement_sales import DecrementSales
from scanners.intake import Intake
from scanners.poll_refund import PollRefund
from scanners.restore_stock import RestoreStock
from scanners.submit_refund import SubmitRefund
from scanners.sync_result import SyncResult


def build_stages(config: Config) -> dict:
    """Every stage, in flow order, configured from ``config``."""
    poll = config.job("poll_refund").poll_delays_seconds
    stages = (Intake(), SubmitRefund(first_poll_delay_seconds=poll[0]), PollRefund(poll), SyncResult(), RestoreStock(), DecrementSales())
    return {s.name: s for s in stages}
