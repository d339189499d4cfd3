"""The alert rules: which conditions hold now, and which messages that makes.

Each rule looks at one reading (the latest database snapshot, this process's WeChat answers over
a sliding window, its stages' state, its clock) and says, per subject (a stage, or the process),
whether it fires and with what value. ``AlertBook`` turns those into messages: one when a subject
starts firing, one when it resolves; a subject that fires again within ``cooldown_seconds`` of its
last firing message stays quiet (and so does its resolve), so a flapping condition costs at most
two messages per cooldown; one still firing when the cooldown has passed is announced then.

Rules about the database (failed rows, oldest pending, ABNORMAL refunds) are evaluated only by the
leader, the running daemon registered first, so that N daemons sharing a database send one
message, not N; a daemon that stops leading forgets them quietly (the leader resolves them). Rules about the process (WeChat failure rate, a stage down, SIGN_ERROR, its clock)
are evaluated by every daemon about itself, and their summaries name the host.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timezone
from typing import Any

from cancel_scanner.alerts.deliver import Alert
from cancel_scanner.i18n import N_, Phrase

FAILURE_OUTCOMES = frozenset({"unknown", "retry_later", "config_error"})  # no usable answer; "permanent" is one
HISTORY_SIZE = 50


class CallWindow:
    """WeChat answers by outcome over the last ``span_seconds``, in one-second buckets (bounded memory)."""

    def __init__(self, span_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.span = int(span_seconds) + 1
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: deque[list] = deque()  # [second, {outcome: n}]

    def record(self, outcome: str) -> None:
        now = int(self.clock())
        with self._lock:
            if not self._buckets or self._buckets[-1][0] != now:
                self._buckets.append([now, {}])
                while self._buckets and self._buckets[0][0] <= now - self.span:
                    self._buckets.popleft()
            counts = self._buckets[-1][1]
            counts[outcome] = counts.get(outcome, 0) + 1

    def counts(self, window_seconds: float) -> dict[str, int]:
        since = self.clock() - window_seconds
        total: dict[str, int] = {}
        with self._lock:
            for second, counts in self._buckets:
                if second >= since:
                    for outcome, n in counts.items():
                        total[outcome] = total.get(outcome, 0) + n
        return total


@dataclass(frozen=True)
class Condition:
    firing: bool
    value: float | int | None
    summary: str
    stage: str | None = None


@dataclass(frozen=True)
class Reading:
    snapshot: Any  # a monitoring Snapshot, or None when the database could not be read
    calls: CallWindow
    down: dict[str, tuple[float, str | None]]  # this process's stages backing off: (seconds, why)
    clock_offset: float | None
    host: str
    routine_stages: frozenset[str] = frozenset()  # stages whose 1/0 rows are routine rejections
    beijing_now: datetime | None = None  # for the reconciliation deadline (tests set it)
    reconcile_expected: bool = False  # the daily reconciliation runs (reconcile.enabled): its lateness is news
    pace_disagreement: str | None = None  # this merchant's processes were configured with different limits: who


def _gateway_failure_rate(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    counts = r.calls.counts(rule.window_seconds)
    total = sum(counts.values())
    failures = sum(n for outcome, n in counts.items() if outcome in FAILURE_OUTCOMES)
    rate = failures / total if total else 0.0
    if "" in firing:  # resolve on a usable rate, or on a whole window without a failure
        still = not (failures == 0 or (total >= rule.min_calls and rate < rule.threshold))
    else:
        still = total >= rule.min_calls and rate >= rule.threshold
    yield (
        "",
        Condition(
            still,
            round(rate, 4),
            Phrase(
                N_(
                    "{host}: {failures} of {total} WeChat Pay calls in the last {window} s got no usable answer"
                    " ({rate}; alert at {threshold} of at least {min_calls} calls)"
                ),
                host=r.host,
                failures=failures,
                total=total,
                window=f"{rule.window_seconds:g}",
                rate=f"{rate:.0%}",
                threshold=f"{rule.threshold:.0%}",
                min_calls=rule.min_calls,
            ),
        ),
    )


def _rows_failed(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    for s in r.snapshot.status.stages:
        if s.stage in r.routine_stages:
            continue
        yield (
            s.stage,
            Condition(
                s.failed >= rule.threshold,
                s.failed,
                Phrase(
                    N_(
                        "{failed} {stage} row(s) failed for good and need a person (cancel-scanner status;"
                        " SELECT * FROM v_cancel_scanner_failed)"
                    ),
                    failed=s.failed,
                    stage=s.stage,
                ),
                s.stage,
            ),
        )


def _oldest_pending(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    for s in r.snapshot.status.stages:
        limit = rule.stage_threshold_seconds.get(s.stage, rule.threshold_seconds)
        age = s.oldest_pending_seconds or 0.0
        yield (
            s.stage,
            Condition(
                age > limit,
                round(age, 1),
                Phrase(
                    N_("{stage}: the oldest pending row has waited {age} s (alert above {limit} s); {pending} pending"),
                    stage=s.stage,
                    age=f"{age:.0f}",
                    limit=f"{limit:g}",
                    pending=s.pending,
                ),
                s.stage,
            ),
        )


def _count(rule: Any, n: int, summary: str, stage: str | None = None) -> Iterator[tuple[str, Condition]]:
    """One count over the whole database, firing from ``rule.threshold`` on."""
    yield "", Condition(n >= rule.threshold, n, summary, stage)


def _abnormal_refunds(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    n = r.snapshot.status.abnormal_refunds
    return _count(
        rule,
        n,
        Phrase(
            N_("{n} refund(s) ABNORMAL at WeChat Pay (the user's card frozen or closed): the merchant must act"), n=n
        ),
        r.snapshot.status.stage_counting("abnormal_refunds"),
    )


def _channel_facts(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    n = r.snapshot.status.channel_facts_open
    return _count(
        rule,
        n,
        Phrase(
            N_(
                "{n} thing(s) WeChat Pay did (a close, a refund) not recorded here yet: the shop's database refused"
                " the write (SELECT * FROM channel_fact WHERE resolved_at IS NULL)"
            ),
            n=n,
        ),
    )


def _ship_due(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    n = r.snapshot.status.count("ship_due")
    return _count(
        rule,
        n,
        Phrase(
            N_(
                "{n} paid order(s) not shipped and close to their ship timeout (jobs.intake.ship_timeout_hours):"
                " ship them, or they are cancelled and refunded at the timeout"
            ),
            n=n,
        ),
        r.snapshot.status.stage_counting("ship_due"),
    )


def _stage_down(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    for stage, (seconds, why) in r.down.items():
        yield (
            stage,
            Condition(
                seconds >= rule.for_seconds,
                round(seconds, 1),
                Phrase(
                    N_("{host}: stage {stage} has been backing off for {seconds} s: {why}"),
                    host=r.host,
                    stage=stage,
                    seconds=f"{seconds:.0f}",
                    why=why or "failing",
                ),
                stage,
            ),
        )
    for stage in firing - set(r.down):  # up again
        yield (
            stage,
            Condition(False, 0, Phrase(N_("{host}: stage {stage} runs again"), host=r.host, stage=stage), stage),
        )


def _config_error(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    n = r.calls.counts(rule.window_seconds).get("config_error", 0)
    yield (
        "sign",
        Condition(
            n > 0,
            n,
            Phrase(
                N_(
                    "{host}: WeChat Pay answered {n} call(s) in the last {window} s with a configuration error"
                    " (SIGN_ERROR, a certificate or key problem): check the merchant's keys and this host's clock"
                ),
                host=r.host,
                n=n,
                window=f"{rule.window_seconds:g}",
            ),
        ),
    )
    yield (
        "limits",
        Condition(
            r.pace_disagreement is not None,
            1 if r.pace_disagreement else 0,
            Phrase(N_("{host}: the limits differ: {what}"), host=r.host, what=r.pace_disagreement)
            if r.pace_disagreement
            else Phrase(N_("{host}: the merchant processes agree on its limits"), host=r.host),
        ),
    )
    if r.clock_offset is not None:
        off = r.clock_offset
        yield (
            "clock",
            Condition(
                abs(off) > rule.clock_skew_seconds,
                round(off, 3),
                Phrase(
                    N_(
                        "{host}: this host's clock is {off} s off the database's (alert above {limit} s;"
                        " WeChat Pay refuses signatures 300 s off): fix NTP"
                    ),
                    host=r.host,
                    off=f"{off:+.1f}",
                    limit=f"{rule.clock_skew_seconds:g}",
                ),
            ),
        )


def _reconcile(rule: Any, r: Reading, firing: set[str]) -> Iterator[tuple[str, Condition]]:
    from datetime import timedelta

    last = r.snapshot.status.reconcile
    now = r.beijing_now or datetime.now(timezone(timedelta(hours=8)))
    yesterday = str((now - timedelta(days=1)).date())
    if last is not None and last["state"] in ("DIFFERS", "FAILED"):
        said = (
            Phrase(
                N_(
                    "reconciliation of {day}: {diffs} difference(s) with WeChat Pay's bill"
                    " (SELECT * FROM reconcile_diff WHERE bill_date = '{day}')"
                ),
                day=last["bill_date"],
                diffs=last["diffs"],
            )
            if last["state"] == "DIFFERS"
            else Phrase(N_("reconciliation of {day}: failed: {error}"), day=last["bill_date"], error=last["last_error"])
        )
        yield "result", Condition(True, last["diffs"], said)
    else:
        yield "result", Condition(False, 0, N_("reconciliation found no difference"))
    done = last is not None and last["bill_date"] >= yesterday and last["state"] in ("CLEAN", "DIFFERS", "NO_BILL")
    late = r.reconcile_expected and now.strftime("%H:%M") >= rule.deadline and not done
    yield (
        "late",
        Condition(
            late,
            0,
            Phrase(
                N_(
                    "yesterday ({day}) is not reconciled yet at {deadline} Beijing time (last: {last}):"
                    " cancel-scanner reconcile --date {day}"
                ),
                day=yesterday,
                deadline=rule.deadline,
                last=last["bill_date"] + " " + last["state"] if last else "-",
            ),
        ),
    )


# rule name -> (evaluate, needs the database snapshot and leadership)
RULES: dict[str, tuple[Callable[..., Iterator[tuple[str, Condition]]], bool]] = {
    "gateway_failure_rate": (_gateway_failure_rate, False),
    "rows_failed": (_rows_failed, True),
    "oldest_pending": (_oldest_pending, True),
    "abnormal_refunds": (_abnormal_refunds, True),
    "channel_facts": (_channel_facts, True),
    "ship_due": (_ship_due, True),
    "stage_down": (_stage_down, False),
    "config_error": (_config_error, False),
    "reconcile": (_reconcile, True),
}


@dataclass
class _Subject:
    firing: bool = False
    announced: bool = False  # a firing message went out for this spell
    last_firing_message: float | None = None


@dataclass
class AlertBook:
    """The rules' state across readings, and the messages it decides to send."""

    rules: Any  # AlertRules
    cooldown_seconds: float
    send: Callable[[Alert], Any]
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = lambda: datetime.now(UTC)
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SIZE))  # messages, newest last
    _subjects: dict[tuple[str, str], _Subject] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def firing(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(key for key, s in self._subjects.items() if s.firing)

    def recent(self) -> tuple[Alert, ...]:
        """The latest messages, newest last (safe to call from the page's threads)."""
        with self._lock:
            return tuple(self.history)

    def evaluate(self, reading: Reading) -> list[Alert]:
        """Apply one reading; returns the messages sent."""
        sent = []
        for name, (rule_fn, needs_db) in RULES.items():
            rule = getattr(self.rules, name)
            if not rule.enabled:
                continue
            if needs_db and reading.snapshot is None:
                continue  # no reading: keep the state
            if needs_db and not reading.snapshot.leader:
                self._forget(name)  # another daemon speaks for the database now (and resolves what it sees)
                continue
            on = {subject for (r, subject), s in self._subjects.items() if r == name and s.firing}
            for subject, condition in rule_fn(rule, reading, on):
                alert = self._apply(name, subject, condition)
                if alert is not None:
                    sent.append(alert)
        return sent

    def _forget(self, rule: str) -> None:
        with self._lock:
            for (r, _subject), s in self._subjects.items():
                if r == rule:
                    s.firing = s.announced = False

    def _apply(self, rule: str, subject: str, c: Condition) -> Alert | None:
        now = self.clock()
        with self._lock:
            s = self._subjects.setdefault((rule, subject), _Subject())
            if c.firing and not s.announced:
                # A new spell, or one kept quiet by the cooldown: announced once the cooldown has
                # passed, so a condition that came back and stays is not left looking resolved.
                s.firing = True
                if s.last_firing_message is not None and now - s.last_firing_message < self.cooldown_seconds:
                    return None
                s.announced, s.last_firing_message = True, now
                state = "firing"
            elif not c.firing and s.firing:
                s.firing = False
                if not s.announced:
                    return None
                s.announced = False
                state = "resolved"
            else:
                return None
        alert = Alert(rule=rule, state=state, summary=c.summary, stage=c.stage, value=c.value, at=self.wall())
        with self._lock:
            self.history.append(alert)
        self.send(alert)
        return alert
