"""The amount rule of partial cancels: exact in fen, never above what was paid, the total at the end."""

from __future__ import annotations

import random

import pytest

from cancel_scanner.scanners.parts import part_amount, refunded_for


def test_three_units_of_ten_yuan_refund_333_333_334_fen():
    parts = [part_amount(1000, 3, c, 1) for c in range(3)]
    assert parts == [333, 333, 334]


def test_a_part_refunds_each_units_share_and_the_last_part_the_rest():
    # 2 of 3 units of 10.00 yuan, then the last one
    assert part_amount(1000, 3, 0, 2) == 666
    assert part_amount(1000, 3, 2, 1) == 334


@pytest.mark.parametrize("seed", range(20))
def test_any_sequence_of_parts_adds_up_to_the_payment_and_never_passes_it(seed):
    rng = random.Random(seed)
    total, quantity = rng.randint(1, 10_000_000), rng.randint(1, 500)
    cancelled, refunded = 0, 0
    while cancelled < quantity:
        units = rng.randint(1, quantity - cancelled)
        amount = part_amount(total, quantity, cancelled, units)
        assert amount >= 0
        cancelled, refunded = cancelled + units, refunded + amount
        assert refunded == refunded_for(total, quantity, cancelled) <= total
        # never more than the units' exact share rounded up, never less than it rounded down minus one fen
        assert total * units // quantity - 1 <= amount <= -(-total * units // quantity)
    assert refunded == total


def test_a_payment_smaller_than_its_units_gives_some_parts_nothing():
    # 2 fen for 3 units: the rule refunds 0, 1 then 1 fen; intake refuses a part worth 0 fen
    assert [part_amount(2, 3, c, 1) for c in range(3)] == [0, 1, 1]


@pytest.mark.parametrize(("total", "quantity", "cancelled"), [(100, 0, 0), (100, 3, 4), (100, 3, -1), (-1, 3, 1)])
def test_a_share_outside_the_order_is_an_error(total, quantity, cancelled):
    with pytest.raises(ValueError):
        refunded_for(total, quantity, cancelled)
