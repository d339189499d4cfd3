"""What migrate plans: its steps, the plan, and the refusal that changes nothing."""

from __future__ import annotations

from dataclasses import dataclass


class SchemaRefused(Exception):
    """The database cannot be brought to the head without changing what is there: nothing was run."""


@dataclass(frozen=True)
class Step:
    what: str
    sql: str
    locks: str
    fallback: str | None = None  # run instead when the server cannot do ``sql`` online


@dataclass
class Plan:
    database: str
    current: int | None  # None: no version recorded
    head: int
    steps: list[Step]
    notes: list[str]
    lock_wait_seconds: int | None = (
        None  # MySQL: what each DDL waits for its metadata lock (the session's first statement)
    )

    @property
    def behind(self) -> bool:
        return bool(self.steps) or self.current is None or self.current < self.head
