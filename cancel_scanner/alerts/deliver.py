"""Alert delivery: each alert becomes one POST to a group robot (WeCom, DingTalk, Feishu) or a JSON receiver.

Alerting must never hurt the work it watches. `Notifier.send` only puts the alert in a bounded
queue (a full queue drops it, and says so); one daemon thread posts. Every POST has one total
deadline, `timeout_seconds` from connect to last byte, so an answer trickled a byte at a time is
cut off; the answer is read up to 64 KiB and no further. A redirect is a failure, never followed:
the robot's key must not travel to another host. A failed POST is tried twice more, so delivery is
at least once (a POST cut off after the robot took it is sent again). `stop` returns within its bound
even when a POST hangs.

The robot's key is in the URL (WeCom's `key` and DingTalk's `access_token` in the query, Feishu's
hook id in the path), and DingTalk's and Feishu's signing secret beside it: neither appears in a log
line, an exception or a repr. Only `redact(url)`, scheme and host, is ever shown.

Merchant text can reach a summary. In a robot's message, line breaks and other whitespace collapse
to single spaces (a summary cannot forge a RESOLVED line of its own) and `< > [ ] @` become their
full-width forms `＜ ＞ ［ ］ ＠`, which no robot reads as a link, a tag or a mention (`@all`,
`<@userid>`, `<at user_id="all">`, `[text](url)`). The `json` format carries the alert as it is: its
receiver is a program, and the object is the public contract (`rule, state, summary, stage, value, at`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import SplitResult, quote_plus, urlsplit

from loguru import logger

from cancel_scanner.i18n import N_, local_time, render, tr

FORMATS = ("wecom", "dingtalk", "feishu", "json")
STATES = ("firing", "resolved")
MAX_TEXT_BYTES = 4096  # WeCom's markdown limit; DingTalk's and Feishu's are larger, so one cap serves all three
MAX_TITLE_BYTES = 128  # DingTalk's title is the notification's preview line
MAX_ANSWER_BYTES = 64 * 1024  # a robot answers a few dozen bytes; the rest is never read
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_QUEUE_SIZE = 100
RETRY_DELAYS_SECONDS = (1.0, 2.0)  # one pause before each of the two extra tries
STOP_CUT_SECONDS = 0.5  # stop() keeps this much of its bound to cut the POST in flight and see the thread end

_NEUTRAL = str.maketrans({"<": "＜", ">": "＞", "[": "［", "]": "］", "@": "＠"})
_ELLIPSIS = "…"


@dataclass(frozen=True)
class Alert:
    """One message: a rule starts firing or is resolved."""

    rule: str  # e.g. "gateway_failure_rate"
    state: str  # "firing" | "resolved"
    summary: str  # one human sentence; may hold Chinese or merchant text
    stage: str | None
    value: float | int | None
    at: datetime  # timezone-aware

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"alert state must be one of {', '.join(STATES)}, not {self.state!r}")
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("alert time must be timezone-aware")


def payload(
    fmt: str,
    alert: Alert,
    *,
    secret: str | None = None,
    now: float | None = None,
    locale: str = "en",
    timezone: str = "UTC",
) -> dict:
    """The JSON body to POST for `fmt`. Feishu signs its body (`now`: seconds since the epoch, for the sign).

    The robots' text is in ``locale`` with its time on ``timezone``'s clock; the `json` format keeps its
    keys, rule, state and UTC time in every language (only its summary is in ``locale``)."""
    _check_format(fmt)
    if fmt == "json":
        value = None if isinstance(alert.value, float) and not math.isfinite(alert.value) else alert.value
        return {
            "rule": alert.rule,
            "state": alert.state,
            "summary": render(alert.summary, locale),
            "stage": alert.stage,
            "value": value,
            "at": alert.at.astimezone(UTC).isoformat(),
        }
    shown = {"locale": locale, "timezone": timezone}
    if fmt == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": _text(alert, sep="\n", bold=True, **shown)}}
    if fmt == "dingtalk":
        title = _cut_utf8(f"{_state_word(alert, locale)} {_neutral(alert.rule)}", MAX_TITLE_BYTES)
        text = _text(alert, sep="\n\n", bold=True, **shown)
        return {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
    body: dict = {"msg_type": "text", "content": {"text": _text(alert, sep="\n", bold=False, **shown)}}
    if secret:
        # Feishu's scheme: the string to sign is the HMAC's key, and the message is empty.
        timestamp = str(int(time.time() if now is None else now))
        digest = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256).digest()
        body |= {"timestamp": timestamp, "sign": base64.b64encode(digest).decode()}
    return body


def target_url(fmt: str, url: str, *, secret: str | None = None, now: float | None = None) -> str:
    """The URL to POST to: `url` itself, or for DingTalk with a secret, `url` signed for the time `now`."""
    _check_format(fmt)
    if fmt != "dingtalk" or not secret:
        return url
    timestamp = str(
        round((time.time() if now is None else now) * 1000)
    )  # DingTalk wants milliseconds, within an hour of its clock
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    sign = quote_plus(base64.b64encode(digest).decode())
    return f"{url}{'&' if '?' in url else '?'}timestamp={timestamp}&sign={sign}"


def redact(url: str) -> str:
    """What may be shown of a webhook URL: scheme and host (and port), never userinfo, path or query."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/…"


class DeadlinePassed(TimeoutError):
    """A POST ran past its total deadline (or stop() cut it): its socket was shut under it."""


class Notifier:
    """Posts alerts from one daemon thread, so that whoever raises an alert never waits on a robot.

    `on_result(outcome)` is called once per alert with "sent", "failed" or "dropped" (queue full, or
    still queued when `stop` ran out of time). Not restartable: one start, one stop.
    """

    def __init__(
        self,
        url: str,
        fmt: str,
        *,
        secret: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        on_result: Callable[[str], None] | None = None,
        wall: Callable[[], float] = time.time,
        retry_delays_seconds: Sequence[float] = RETRY_DELAYS_SECONDS,
        locale: str = "en",
        timezone: str = "UTC",
    ) -> None:
        _check_format(fmt)
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"alert webhook must be an http or https URL: {redact(url)}")
        if timeout_seconds <= 0 or queue_size < 1:
            raise ValueError("timeout_seconds must be positive and queue_size at least 1")
        self._url, self._fmt, self._secret = url, fmt, secret
        self._shown = {"locale": locale, "timezone": timezone}  # the robots' language and clock
        self._timeout = float(timeout_seconds)
        self._queue_size = queue_size
        self._on_result = on_result
        self._wall = wall
        self._delays = tuple(retry_delays_seconds)
        self._changed = threading.Condition()  # guards everything below
        self._queue: deque[Alert] = deque()
        self._in_flight = False
        self._stopping = False
        self._abandoned = False  # stop() ran out of time: no new POST may start
        self._cut: _Cut | None = None  # the POST in flight, for stop() to cut
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Notifier(format={self._fmt!r}, url={redact(self._url)!r})"

    def start(self) -> Notifier:
        self._thread = threading.Thread(target=self._run, name=f"alerts-{self._fmt}", daemon=True)
        self._thread.start()
        return self

    def send(self, alert: Alert) -> bool:
        """Queue `alert` and return at once; False (and "dropped") when the queue is full or stopping."""
        with self._changed:
            refused = (
                "the notifier is stopping"
                if self._stopping
                else ("the queue is full" if len(self._queue) >= self._queue_size else "")
            )
            if not refused:
                self._queue.append(alert)
                self._changed.notify_all()
        if refused:
            self._drop(alert, refused)  # outside the lock: a log sink may be slow
        return not refused

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (one try each) while `timeout` lasts, then drop the rest and cut the POST in flight.

        Never waits longer than `timeout`: a POST that cannot be cut (a connect still under way) is left
        to its own deadline on the daemon thread.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(max(deadline - time.monotonic() - min(STOP_CUT_SECONDS, timeout / 2), 0))
        with self._changed:
            left, cut = list(self._queue), self._cut
            self._queue.clear()
            self._abandoned = True
            self._changed.notify_all()
        for alert in left:
            self._drop(alert, "the notifier stopped first")
        if cut is not None:
            cut()
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0))

    def wait_idle(self, timeout: float) -> bool:
        """True once the queue is empty and no alert is in flight (every outcome reported); False after `timeout`."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                alert = self._queue.popleft()
                self._in_flight = True
            try:
                self._report(self._deliver(alert))
            except Exception as exc:  # noqa: BLE001 - a bug here must not end alerting; never a traceback: it holds the URL
                logger.bind(stage="alerts", action="bug").error("alert delivery failed: {}", type(exc).__name__)
                self._report("failed")
            finally:
                with self._changed:
                    self._in_flight = False
                    self._changed.notify_all()

    def _deliver(self, alert: Alert) -> str:
        cause = ""
        for attempt, pause in enumerate((0.0, *self._delays)):
            if attempt:
                with self._changed:
                    if self._changed.wait_for(lambda: self._stopping, pause):
                        break  # stopping: no more tries
            cause = self._attempt(alert)
            if not cause:
                logger.bind(stage="alerts", action="sent", rule=alert.rule).info(
                    "alert {} {} sent to {} ({})", alert.rule, alert.state, redact(self._url), self._fmt
                )
                return "sent"
            logger.bind(stage="alerts", action="retry", rule=alert.rule).debug(
                "alert {} try {} failed: {}", alert.rule, attempt + 1, cause
            )
        logger.bind(stage="alerts", action="failed", rule=alert.rule).warning(
            "alert {} {} not delivered to {} ({}): {}", alert.rule, alert.state, redact(self._url), self._fmt, cause
        )
        return "failed"

    def _attempt(self, alert: Alert) -> str:
        """One POST; "" when the robot took it, else the cause (a status, an errcode or an exception's class)."""
        now = self._wall()
        body = json.dumps(payload(self._fmt, alert, secret=self._secret, now=now, **self._shown)).encode()
        target = urlsplit(target_url(self._fmt, self._url, secret=self._secret, now=now))
        try:
            status, answer = self._post(target, body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return type(exc).__name__  # never str(exc): some messages quote the URL
        return _judge(self._fmt, status, answer)

    def _post(self, target: SplitResult, body: bytes) -> tuple[int, bytes]:
        # The socket timeout bounds each read; the cut bounds them all together (a trickle resets a timeout).
        kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        assert target.hostname, "__init__ refused a webhook URL without a host"
        conn = kind(target.hostname, target.port, timeout=self._timeout)
        cut = _Cut(conn)
        timer = threading.Timer(self._timeout, cut)
        timer.daemon = True
        with self._changed:
            self._cut = cut
            if self._abandoned:
                cut()
        timer.start()
        try:
            conn.connect()
            if cut.fired:
                raise DeadlinePassed()  # cut during the connect, before there was a socket to shut
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            conn.request("POST", path, body, {"Content-Type": "application/json", "Connection": "close"})
            response = conn.getresponse()
            answer = response.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException):
            if cut.fired:
                raise DeadlinePassed() from None
            raise
        finally:
            timer.cancel()
            conn.close()
            with self._changed:
                self._cut = None
        if cut.fired:
            raise DeadlinePassed()  # part of a trickled answer came in before the cut
        return response.status, answer

    def _drop(self, alert: Alert, why: str) -> None:
        logger.bind(stage="alerts", action="dropped", rule=alert.rule).warning(
            "alert {} {} dropped: {}", alert.rule, alert.state, why
        )
        self._report("dropped")

    def _report(self, outcome: str) -> None:
        try:
            if self._on_result is not None:
                self._on_result(outcome)
        except Exception as exc:  # noqa: BLE001 - a broken metric must not stop delivery
            logger.bind(stage="alerts", action="report_failed").error("on_result raised {}", type(exc).__name__)


class _Cut:
    """Shuts one connection's socket: the blocked read or write returns at once and the POST ends."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self._conn = conn
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: nothing left to interrupt


def _judge(fmt: str, status: int, answer: bytes) -> str:
    """ "" when the answer means delivered; else why not. Robots answer 200 with an error code in the body."""
    if not 200 <= status < 300:
        return f"HTTP {status}"  # 3xx included: a redirect is never followed
    if fmt == "json":
        return ""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return "answer is not JSON"
    if not isinstance(parsed, dict):
        return "answer is not a JSON object"
    if fmt == "feishu":
        code = parsed.get("code", parsed.get("StatusCode"))  # older Feishu answers say StatusCode
        return "" if code == 0 else f"code {code}"
    code = parsed.get("errcode")
    return "" if code == 0 else f"errcode {code}"


def _text(alert: Alert, *, sep: str, bold: bool, locale: str = "en", timezone: str = "UTC") -> str:
    """The robots' text: FIRING/RESOLVED and the rule, then summary, stage, value, time; at most MAX_TEXT_BYTES."""
    t = tr(locale)
    word = _state_word(alert, locale)
    state = f"**{word}**" if bold else word
    head = f"{state} {_neutral(alert.rule)}"
    tail = [] if alert.stage is None else [t(N_("stage: {stage}")).format(stage=_neutral(alert.stage))]
    tail += [] if alert.value is None else [t(N_("value: {value}")).format(value=alert.value)]
    tail += [t(N_("at: {time}")).format(time=local_time(alert.at, timezone))]
    summary = _neutral(render(alert.summary, locale))
    room = MAX_TEXT_BYTES - len(sep.join([head, "", *tail]).encode())  # the summary gives way, not the facts
    return _cut_utf8(sep.join([head, _cut_utf8(summary, room), *tail]), MAX_TEXT_BYTES)


def _state_word(alert: Alert, locale: str = "en") -> str:
    return tr(locale)(N_("FIRING") if alert.state == "firing" else N_("RESOLVED"))


def _neutral(text: str) -> str:
    # A lone surrogate cannot be encoded: it becomes "?" rather than failing the message.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(text.split()).translate(_NEUTRAL)


def _cut_utf8(text: str, limit: int) -> str:
    """`text` if its UTF-8 fits in `limit` bytes, else a prefix ending in "…" that does, cut between characters."""
    data = text.encode()
    if len(data) <= limit:
        return text
    room = max(limit - len(_ELLIPSIS.encode()), 0)
    return data[:room].decode("utf-8", "ignore") + _ELLIPSIS  # "ignore" drops only the split last character


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"alert format must be one of {', '.join(FORMATS)}, not {fmt!r}")
