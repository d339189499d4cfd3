"""The stage registry refuses a flow that cannot run: duplicate names, hand-offs to nowhere."""

from __future__ import annotations

import pytest

from cancel_scanner.scanners import REGISTRY
from cancel_scanner.scanners.intake import Intake
from tests.flow import STAGES_IN_FLOW_ORDER, test_config


def test_the_registry_lists_the_eight_stages_in_flow_order_with_their_kinds():
    assert REGISTRY.names == STAGES_IN_FLOW_ORDER
    assert [c.kind for c in REGISTRY.classes] == [
        "database",
        "gateway",
        "gateway",
        "gateway",
        "database",
        "database",
        "database",
        "database",
    ]


def test_a_second_stage_with_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="share a name"):
        REGISTRY.with_stage(Intake)


def test_a_hand_off_to_a_stage_that_does_not_exist_is_refused_when_the_stages_are_built():
    class Shouts(Intake):
        name = "shouts"
        feeds = ()

        @classmethod
        def from_config(cls, config):
            return cls()  # a stage the configuration never heard of: intake's own keys are not its

        def handoffs(self):
            return {"nobody_listens": 0.0}

    registry = REGISTRY.with_stage(Shouts)
    with pytest.raises(ValueError, match="nobody_listens"):
        registry.build(test_config("sqlite://"))
