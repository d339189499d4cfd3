"""The shape of a stage, as the engine sees it.

A stage answers three questions and no more: which rows are ready (``ready``),
what to do with a batch of them (``process``, or ``call`` + ``apply`` for a
stage that talks to the gateway), and which flags it flips (``flags``). It gets
a connection inside a transaction the engine opened; it never commits, sleeps,
loops, counts attempts or decides a backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from sqlalchemy import Column, Connection, Row, Select, Table

from cancel_scanner.engine.outcome import Done, Failed, Outcome
from cancel_scanner.engine.settings import JobSettings


@dataclass(frozen=True)
class Flags:
    """The columns through which a stage reports its progress on a row."""

    table: Table
    scanned: Column
    success: Column
    attempts: Column
    next_attempt_at: Column
    last_error: Column
    # Gateway stages only: who is calling the gateway for the row, and until when.
    lease_owner: Column | None = None
    lease_until: Column | None = None
    # Gateway stages whose call must not be repeated blind: set to 1 when a row is leased, before any
    # call (a crash between send and answer must leave it), put back as it was when the call never left.
    # The stage reads it as "an earlier call may have reached the gateway".
    sent: Column | None = None

    @property
    def id(self) -> Column:
        return self.table.c.id

    @classmethod
    def on(
        cls, table: Table, flag: str = "", *, retry: str = "", leased: bool = False, sent: str | None = None
    ) -> Flags:
        """The columns by the contract's naming: ``<flag>_scanned``/``<flag>_success``, and
        ``<retry>_attempts``/``_next_attempt_at``/``_last_error`` and, leased, ``<retry>_lease_owner``/
        ``_lease_until`` (no prefix: the table's own)."""
        c, f, r = table.c, f"{flag}_" if flag else "", f"{retry}_" if retry else ""
        return cls(
            table=table,
            scanned=c[f"{f}scanned"],
            success=c[f"{f}success"],
            attempts=c[f"{r}attempts"],
            next_attempt_at=c[f"{r}next_attempt_at"],
            last_error=c[f"{r}last_error"],
            lease_owner=c[f"{r}lease_owner"] if leased else None,
            lease_until=c[f"{r}lease_until"] if leased else None,
            sent=c[sent] if sent else None,
        )


class Stage(Protocol):
    name: ClassVar[str]
    kind: ClassVar[str]  # "database" or "gateway"
    flags: ClassVar[Flags]
    settings: ClassVar[type]  # its job's settings model
    feeds: ClassVar[tuple[str, ...]]
    failed_note: ClassVar[str | None]  # how `status` describes its 1/0 rows (None: "need a person")
    pending_since: ClassVar[Column]  # the column `status` measures the oldest pending row's age by

    # Conditions that are always true of a finished row and lead the stage's index, so that
    # `status` can count done/failed rows from the index alone.
    index_prefix: ClassVar[tuple] = ()
    # True when a 1/0 row is business as usual (a rejected merchant request), logged at INFO.
    rejections_are_routine: ClassVar[bool] = False
    # Further conditions a 1/0 row meets while it still needs a person (poll_refund: not reissued yet).
    still_failing: ClassVar[tuple] = ()
    # A bug stays pending instead of ending 1/0; a row whose channel fact was not kept never ends 1/0.
    bugs_stay_pending: ClassVar[bool] = False
    fact_stays_pending: ClassVar[bool] = False

    def channel_fact(self, row: Row, result: Any) -> Any:
        """What the gateway did for ``row`` by ``result`` (an ``engine.facts.Fact``), or None."""

    def pending(self) -> list:
        """WHERE clauses for rows this stage will still act on, whenever they are due."""

    def ready(self, now: datetime, limit: int) -> Select:
        """A bounded query for the rows due now (pending and due); selects ``id`` and the attempts column."""

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        """Extra columns set when a row is done (on the polled table)."""

    def failed_values(self, outcome: Failed, now: datetime) -> Mapping[str, Any]:
        """Extra columns set when a row fails for good (on the polled table)."""

    def status_counts(self, conn: Connection, now: datetime) -> Sequence[tuple[str, str, int]]:
        """Extra figures for `status`: (key, label, count); ``now`` is the database's time."""


class DbStage(Stage, Protocol):
    def process(self, conn: Connection, rows: Sequence[Row], now: datetime) -> Mapping[int, Outcome]:
        """Do the stage's writes for the batch; return an outcome for every row id."""

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes: Mapping[int, Outcome], now: datetime) -> None:
        """The batch's last writes, after its flags are flipped, just before the commit.

        For rows shared with the shop (goods): locks taken here are held only until the commit.
        Raise ``Contended`` for rows whose shared row someone else holds.
        """


@dataclass(frozen=True)
class Wait:
    """A claimed row a gateway stage does not call yet: due again ``at``, saying ``why`` (its last_error)."""

    at: datetime
    why: str


class GatewayStage(Stage, Protocol):
    # The gateway endpoint whose pace bounds how many rows one batch may lease ("apply", "query").
    endpoint: ClassVar[str]

    def call(self, gateway: Any, row: Row, deadline: Callable[[], float]) -> Any:
        """One gateway call for one row; runs outside any transaction.

        ``deadline()`` is the monotonic instant by which the call must be over; pass it to the gateway.
        """

    def not_sent(self, result: Any) -> bool:
        """True when the result says the call never left (nothing reached the gateway)."""

    def admit(self, conn: Connection, rows: Sequence[Row], now: datetime) -> tuple[list[Row], Mapping[int, Wait]]:
        """In the lease's transaction, before any lease: the claimed rows that may be called now, and
        for the others when to look again and why (the channel's own rules, such as a spacing between
        calls about one payment). A waiting row keeps its attempts; it is not leased."""

    def apply(self, conn: Connection, results: Sequence[tuple[Row, Any]], now: datetime) -> Mapping[int, Outcome]:
        """Write what the gateway said; return an outcome for every row id."""


class StageDefaults:
    """No extra columns, hand-offs or notes unless a stage says so."""

    name: ClassVar[str]  # each stage declares these two
    flags: ClassVar[Flags]
    kind: ClassVar[str] = "database"
    settings: ClassVar[type] = JobSettings
    feeds: ClassVar[tuple[str, ...]] = ()
    failed_note: ClassVar[str | None] = None
    index_prefix: ClassVar[tuple] = ()
    rejections_are_routine: ClassVar[bool] = False
    still_failing: ClassVar[tuple] = ()
    takes_notifications: ClassVar[bool] = False  # a stage with poll_soon(conn, number, now)
    # The oldest_pending alert's threshold for this stage, when its rows wait longer by nature than
    # alerts.rules.oldest_pending.threshold_seconds (None: that one); jobs.yaml may still set its own.
    oldest_pending_alert_seconds: ClassVar[float | None] = None
    # A row that fails for a reason nobody foresaw (a bug) stays pending instead of ending 1/0: for a
    # stage whose 1/0 answers a merchant, who must never read an internal error.
    bugs_stay_pending: ClassVar[bool] = False
    # A row whose channel fact (what the gateway did) could not be written never ends 1/0: for a
    # stage whose 1/0 would say the channel refused.
    fact_stays_pending: ClassVar[bool] = False

    def admit(self, conn: Connection, rows: Sequence[Row], now: datetime) -> tuple[list[Row], Mapping[int, Wait]]:
        return list(rows), {}

    def failed_reason(self) -> Any:
        """What the page and `status` show as a 1/0 row's reason (an SQL expression): its last_error."""
        return self.flags.last_error

    def channel_fact(self, row: Row, result: Any) -> Any:
        """What the gateway did for ``row`` by ``result`` (a ``engine.facts.Fact``), kept if its write-back fails; or None."""
        return None

    @classmethod
    def from_config(cls, config: Any) -> Any:
        return cls()

    def handoffs(self) -> Mapping[str, float]:
        """Consumers to wake when rows were finished, and after how many seconds."""
        return {name: 0.0 for name in self.feeds}

    def status_counts(self, conn: Connection, now: datetime) -> Sequence[tuple[str, str, int]]:
        """Extra figures for `status`: (key, label, count). Each a bounded, indexed query."""
        return ()

    def attention(self, conn: Connection, limit: int) -> Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]]:
        """Rows for the status page beyond the failed ones: (key, label, at most ``limit`` rows as dicts)."""
        return ()

    def finish(self, conn: Connection, rows: Sequence[Row], outcomes: Mapping[int, Outcome], now: datetime) -> None:
        return None

    def leased_by(self, owner: str) -> list:
        """WHERE clauses for this gateway stage's rows leased to ``owner``. A leased row is always
        pending (the flip releases it), so the count reads the backlog's range of the stage's index,
        never the finished rows, whether or not the lease owner has an index of its own."""
        f = self.flags
        return [*self.index_prefix, f.scanned == 0, f.success == 0, f.lease_owner == owner]

    def done_values(self, outcome: Done, now: datetime) -> Mapping[str, Any]:
        return {}

    def failed_values(self, outcome: Failed, now: datetime) -> Mapping[str, Any]:
        return {}


def distinct_names(classes: Sequence[Any], what: str) -> tuple[str, ...]:
    """The classes' ``name``s in order; ValueError when two of them (``what``: stages, channels) share one."""
    names = [cls.name for cls in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"two {what} share a name: {names}")
    return tuple(names)


class StageRegistry:
    """The stages in flow order, each declared once in its own module. Everything else iterates over this.

    A stage class declares: ``name``; ``kind`` ("database" or "gateway"); ``flags``; ``settings``
    (its job's settings model: keys, types, defaults); ``feeds`` (the stages that consume what it
    finishes, woken at once); ``failed_note`` (how `status` describes its 1/0 rows); and
    ``from_config(config)`` to build it.
    """

    def __init__(self, classes: Sequence[type[StageDefaults]]):
        self.classes = tuple(classes)
        self.names = distinct_names(classes, "stages")
        for cls in classes:
            unknown = set(getattr(cls, "feeds", ())) - set(self.names)
            if unknown:
                raise ValueError(f"stage {cls.name} feeds unknown stages {sorted(unknown)}")
            if cls.kind not in ("database", "gateway"):
                raise ValueError(f"stage {cls.name}: kind must be 'database' or 'gateway', not {cls.kind!r}")
            if cls.kind == "gateway" and cls.flags.lease_owner is None:
                raise ValueError(f"gateway stage {cls.name} needs lease columns in its flags")

    def alert_thresholds(self) -> dict[str, float]:
        """The oldest_pending alert thresholds the stages declare for themselves, by stage."""
        declared = {cls.name: getattr(cls, "oldest_pending_alert_seconds", None) for cls in self.classes}
        return {name: float(seconds) for name, seconds in declared.items() if seconds is not None}

    def settings(self, name: str) -> type:
        return self._by_name(name).settings

    def build(self, config: Any) -> dict[str, Any]:
        """Every stage, in flow order, configured from ``config``."""
        stages = {cls.name: cls.from_config(config) for cls in self.classes}
        for stage in stages.values():
            unknown = set(stage.handoffs()) - set(self.names)
            if unknown:
                raise ValueError(f"stage {stage.name} hands off to unknown stages {sorted(unknown)}")
        return stages

    def with_stage(self, cls: type[StageDefaults]) -> StageRegistry:
        """This registry with one more stage at the end (a plug-in, a test's throwaway stage)."""
        return StageRegistry([*self.classes, cls])

    def _by_name(self, name: str) -> type[StageDefaults]:
        for cls in self.classes:
            if cls.name == name:
                return cls
        raise KeyError(name)
