"""The client-side pacer, on a fake clock: no test here sleeps."""

from __future__ import annotations

import threading

import pytest

from gateway.ratelimit import RateLimiter


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0 - 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_calls_are_paced_one_interval_apart():
    fake = FakeTime()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)

    slots = [limiter.acquire() for _ in range(11)]

    assert slots == pytest.approx([100.0 + i * 0.2 for i in range(11)])
    assert max_in_any_second(slots) == 5


def test_the_first_call_does_not_wait():
    fake = FakeTime()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)

    limiter.acquire()

    assert fake.slept == []


def test_an_idle_period_banks_no_burst():
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=fake.sleep)
    limiter.acquire()
    fake.now += 60  # a long quiet spell

    slots = [limiter.acquire() for _ in range(20)]

    assert max_in_any_second(slots) == 10
    assert slots[1] - slots[0] == pytest.approx(0.1)


def test_concurrent_callers_get_distinct_slots_spaced_by_the_interval():
    # The clock stands still and sleep returns at once: each thread only reserves slots.
    limiter = RateLimiter(100, clock=lambda: 0.0, sleep=lambda seconds: None)
    slots: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            slot = limiter.acquire()
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(slots) == pytest.approx([i * 0.01 for i in range(400)])
    assert max_in_any_second(slots) == 100


def test_each_caller_sleeps_until_its_own_slot():
    waits: list[float] = []
    limiter = RateLimiter(4, clock=lambda: 10.0, sleep=waits.append)

    for _ in range(4):
        limiter.acquire()

    assert waits == pytest.approx([0.25, 0.5, 0.75])


def test_no_qps_means_no_waiting():
    waits: list[float] = []
    limiter = RateLimiter(None, clock=lambda: 10.0, sleep=waits.append)

    for _ in range(1000):
        limiter.acquire()

    assert waits == []


@pytest.mark.parametrize("qps", [0, -1])
def test_a_non_positive_rate_is_refused(qps):
    with pytest.raises(ValueError):
        RateLimiter(qps)
