"""engine.isolate: the search that finds the rows at fault in a batch, committing everyone else's work.

A fake connection stands for the database: a try "writes" its items, a savepoint rollback undoes
them. Given batches with no, one, several, adjacent or only bad items, every good item is written
exactly once, every bad one is reported with its own error, and one bad item in 200 costs 8 to 16
tries, not one per item.
"""

from __future__ import annotations

import pytest

from cancel_scanner.engine.isolate import isolate


class Refused(Exception):
    pass


class Bug(Exception):
    pass


class FakeSavepoint:
    def __init__(self, conn: FakeConn) -> None:
        self.conn, self.mark, self.is_active = conn, len(conn.written), True

    def rollback(self) -> None:
        del self.conn.written[self.mark :]
        self.is_active = False

    def commit(self) -> None:
        self.is_active = False


class FakeConn:
    def __init__(self) -> None:
        self.written: list[int] = []
        self.tries = 0

    def begin_nested(self) -> FakeSavepoint:
        return FakeSavepoint(self)


def run(items: list[int], bad: set[int], conn: FakeConn | None = None):
    conn = conn or FakeConn()

    def attempt(part: list[int]) -> list[int]:
        conn.tries += 1
        for item in part:  # set-based: the statement gets as far as the bad row, then fails whole
            conn.written.append(item)
            if item in bad:
                raise Refused(f"row {item}")
        return part

    done = isolate(conn, items, attempt, lambda exc: isinstance(exc, Refused))
    return conn, done


@pytest.mark.parametrize("bad", [set(), {1}, {100}, {200}, {7, 8}, {3, 150, 151, 199}, set(range(1, 201, 2))])
def test_every_good_row_is_written_once_and_every_bad_one_reported_with_its_own_error(bad):
    items = list(range(1, 201))
    conn, done = run(items, bad)
    assert sorted(conn.written) == [i for i in items if i not in bad]
    assert sorted(item for item, _ in done.faults) == sorted(bad)
    assert all(str(exc) == f"row {item}" for item, exc in done.faults)
    assert sorted(i for part in done.results for i in part) == sorted(conn.written)


@pytest.mark.parametrize("bad", [1, 100, 101, 137, 200])
def test_one_bad_row_in_200_costs_8_to_16_tries_not_200(bad):
    conn, done = run(list(range(1, 201)), {bad})
    assert [item for item, _ in done.faults] == [bad]
    # The whole batch, then per level one half (and the other when the first failed too: it is not known).
    assert 1 + 8 <= conn.tries <= 1 + 2 * 8


def test_a_batch_with_only_bad_rows_reports_them_all():
    conn, done = run([1, 2, 3], {1, 2, 3})
    assert conn.written == [] and sorted(item for item, _ in done.faults) == [1, 2, 3]


def test_a_failure_that_is_no_rows_fault_is_raised_at_once_and_nothing_is_kept():
    conn = FakeConn()

    def attempt(part: list[int]) -> None:
        conn.tries += 1
        conn.written.extend(part)
        raise Bug("the database went away")

    with pytest.raises(Bug):
        isolate(conn, [1, 2, 3], attempt, lambda exc: isinstance(exc, Refused))
    assert conn.written == [] and conn.tries == 1
