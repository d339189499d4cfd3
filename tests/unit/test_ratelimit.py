"""The client-side pacer, on a fake clock: no test here sleeps."""

from __future__ import annotations

import threading

import pytest

from cancel_scanner.gateway.ratelimit import RateLimiter


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def in_threads(worker, n: int) -> None:
    """Run ``worker`` on n threads at once and wait for all of them."""
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


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

    in_threads(worker, 8)

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


# -- try_acquire: a caller with a deadline books a slot only if it is early enough ---------------


def test_try_acquire_books_and_waits_for_a_slot_early_enough():
    fake = FakeTime()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)
    limiter.acquire()  # slot 100.0

    slot = limiter.try_acquire(latest_start=100.5)

    assert slot == pytest.approx(100.2)
    assert fake.slept == pytest.approx([0.2])
    assert limiter.acquire() == pytest.approx(100.4)


def test_try_acquire_refuses_a_slot_too_late_and_books_nothing():
    fake = FakeTime()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)
    limiter.acquire()  # slot 100.0; the next free one is 100.2

    assert limiter.try_acquire(latest_start=100.1) is None

    assert fake.slept == []  # refused at once, no waiting
    assert limiter.acquire() == pytest.approx(100.2)  # the refused slot is still the next one


def test_try_acquire_takes_a_slot_exactly_at_the_latest_start():
    fake = FakeTime()
    limiter = RateLimiter(4, clock=fake.clock, sleep=fake.sleep)
    limiter.acquire()

    assert limiter.try_acquire(latest_start=100.25) == pytest.approx(100.25)


def test_try_acquire_unpaced_goes_now_unless_now_is_already_too_late():
    fake = FakeTime()
    limiter = RateLimiter(None, clock=fake.clock, sleep=fake.sleep)

    assert limiter.try_acquire(latest_start=100.0) == 100.0
    assert limiter.try_acquire(latest_start=99.9) is None
    assert fake.slept == []


def test_concurrent_try_acquire_books_only_the_slots_before_the_latest_start():
    # Frozen clock, instant sleep: 8 threads race for slots 0.0, 0.1 ... of which 0.0 .. 0.4 qualify.
    limiter = RateLimiter(10, clock=lambda: 0.0, sleep=lambda seconds: None)
    slots: list[float] = []
    refused: list[None] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            slot = limiter.try_acquire(latest_start=0.45)
            with lock:
                if slot is None:
                    refused.append(slot)
                else:
                    slots.append(slot)

    in_threads(worker, 8)

    assert sorted(slots) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert len(refused) == 75
    assert limiter.acquire() == pytest.approx(0.5)  # refusals booked nothing


# -- calls_within: what is left for a caller planning a batch --------------------------------------


def test_calls_within_counts_free_slots_after_those_already_booked():
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=lambda seconds: None)

    assert limiter.calls_within(1.0) == 11  # 100.0, 100.1 ... 101.0
    assert limiter.calls_within(0.05) == 1
    for _ in range(3):
        limiter.acquire()  # another thread books 100.0 .. 100.2; the clock has not moved
    assert limiter.calls_within(1.0) == 8  # 100.3 ... 101.0
    assert limiter.calls_within(0.25) == 0
    fake.now += 5  # an idle spell banks nothing
    assert limiter.calls_within(1.0) == 11


def test_calls_within_books_nothing_and_is_none_when_unpaced():
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=fake.sleep)

    limiter.calls_within(1.0)

    assert limiter.acquire() == 100.0
    assert limiter.calls_within(-1.0) == 0
    assert RateLimiter(None).calls_within(1.0) is None


def test_a_new_rate_spaces_the_slots_after_those_already_booked():
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=fake.sleep)
    first = [limiter.acquire() for _ in range(3)]  # 100.0, 100.1, 100.2
    limiter.set_qps(2)  # three processes now share what this one had alone, say

    later = [limiter.acquire() for _ in range(3)]

    assert first == pytest.approx([100.0, 100.1, 100.2])
    assert later == pytest.approx([100.3, 100.8, 101.3])  # the slot booked at 10/s, then 2/s


def test_a_hold_starts_no_call_before_its_end_and_lifting_it_frees_the_slots_again():
    fake = FakeTime()
    limiter = RateLimiter(10, clock=fake.clock, sleep=fake.sleep)
    limiter.hold_until(102.0)

    assert limiter.calls_within(1.5) == 0
    assert limiter.try_acquire(101.9) is None
    assert limiter.acquire() == pytest.approx(102.0)  # a caller without a deadline waits the hold out
    limiter.hold_until(float("-inf"))
    assert limiter.acquire() == pytest.approx(102.1)


class LateWaker(FakeTime):
    """A busy machine: the callers that booked slots 0.2 s apart are all woken at once, seconds after
    their slots. Until ``wake_all``, a sleep blocks; after it, a sleep moves the clock on by its length."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()
        self.sleeping = 0
        self.awake = False

    def clock(self) -> float:
        with self.changed:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.changed:
            if self.awake:
                self.now += seconds
                return
            self.sleeping += 1
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.awake, timeout=10)

    def wake_all(self, at: float) -> None:
        with self.changed:
            self.now, self.awake = at, True
            self.changed.notify_all()


def test_callers_that_wake_late_together_still_start_no_more_than_the_pace_lands_in_one_second():
    fake = LateWaker()
    limiter = RateLimiter(5, clock=fake.clock, sleep=fake.sleep)
    starts: list[float] = []
    lock = threading.Lock()

    def call() -> None:
        limiter.acquire()
        with lock:
            starts.append(fake.clock())  # the instant the call leaves

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    with fake.changed:  # every caller but the first (its slot is now) asleep until its slot
        assert fake.changed.wait_for(lambda: fake.sleeping == 19, timeout=10)
    fake.wake_all(at=100.0 + 10)  # all of them, 10 s late: every slot (100.0 .. 103.8) is past
    for thread in threads:
        thread.join(10)

    assert len(starts) == 20
    # Strict pacing at 5/s lands at most 6 starts in any one-second window (floor(5) + 1); waking late
    # together must not turn the booked slots into a burst.
    assert max_in_any_second(starts) <= 6
