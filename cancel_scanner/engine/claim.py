"""Claiming ready rows: locked, our slice first beside other processes, quarantined rows left out."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection, Row

from cancel_scanner.engine.registry import Registry
from cancel_scanner.engine.stage import Stage


class Claimer:
    """Ready rows of a stage, locked for the transaction (FOR UPDATE SKIP LOCKED on MySQL; SQLite has
    one writer and BEGIN IMMEDIATE).

    Beside other processes, the rows of our own slice first, then any: claimers pick different rows
    instead of racing for the same first ones, which on Galera, where SKIP LOCKED does not see another
    node's locks, would only be settled at COMMIT (a lost claim). A slice is every N-th block of
    ``block`` consecutive ids (N live processes, ours the k-th). Ours are found by a plain read (no
    lock) and then locked by id: a locking read filtered by the slice would lock, for a moment, every
    row it scans on its way, the other slices' too, and on Galera another node's write applied to
    such a row aborts our whole transaction.
    """

    def __init__(self, registry: Registry, *, mysql: bool, monotonic: Callable[[], float]):
        self.registry = registry
        self.mysql = mysql
        self.monotonic = monotonic
        # Rows whose own flags the database refuses to change, by stage: left out of claims until then.
        self._quarantined: dict[str, dict[int, float]] = {}

    def claim(self, conn: Connection, stage: Stage, now: datetime, limit: int, *, block: int) -> list[Row]:
        held = self._quarantined_ids(stage.name)
        if held:
            return [r for r in self._claim_ready(conn, stage, now, limit + len(held), block) if r.id not in held][
                :limit
            ]
        return self._claim_ready(conn, stage, now, limit, block)

    def quarantine(self, stage: str, row_id: int, seconds: float) -> None:
        """Leave ``row_id`` out of this process's claims for ``seconds``."""
        self._quarantined.setdefault(stage, {})[row_id] = self.monotonic() + seconds

    def _quarantined_ids(self, stage: str) -> list[int]:
        held = self._quarantined.get(stage)
        if not held:
            return []
        now = self.monotonic()
        for row_id in [i for i, until in held.items() if until <= now]:
            del held[row_id]
        return sorted(held)

    def _claim_ready(self, conn: Connection, stage: Stage, now: datetime, limit: int, block: int) -> list[Row]:
        rank, of = self.registry.slice
        if of <= 1:
            return self._locked(conn, stage.ready(now, limit))
        ids = stage.flags.id
        seen = [r.id for r in conn.execute(stage.ready(now, limit * of)).all()]
        mine = [i for i in seen if (i // block) % of == rank][:limit]
        rows: list[Row] = []
        if mine:
            # By primary key: the ready query's own index would scan (and lock) from the first pending row.
            by_key = stage.ready(now, limit).where(ids.in_(mine))
            for dialect in ("mysql", "mariadb"):
                by_key = by_key.with_hint(stage.flags.table, "FORCE INDEX (PRIMARY)", dialect)
            rows = self._locked(conn, by_key)
        if len(rows) < limit:
            rest = stage.ready(now, limit - len(rows))
            if rows:
                rest = rest.where(ids.not_in([r.id for r in rows]))
            rows += self._locked(conn, rest)
        return rows

    def _locked(self, conn: Connection, query) -> list[Row]:
        if self.mysql:
            query = query.with_for_update(skip_locked=True)
        return list(conn.execute(query).all())
