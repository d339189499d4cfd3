"""Payment channels as plugins: every order and refund names its channel, and every call is routed by it.

A channel is a class with a ``name`` (what goods_order2.channel and refund_order.channel hold) and
``build(config, stack)``, which returns its gateway: an object answering the calls of
``gateway.contract`` (RefundGateway, PaymentGateway) with the contract's results, never raising for
an answer. ``CHANNELS`` lists the channels a daemon builds; ``with_channel`` adds one (a plug-in, a
test's throwaway channel) in one line, as ``StageRegistry.with_stage`` adds a stage.

The engine and the stages see one object, ``Channels``: the stages ask it for a row's channel
(``route``), the engine asks it for a budget of calls and the pace it shares. A row whose channel
this daemon does not serve is never sent: its calls answer NotSent, so the row goes back unspent
for a daemon that serves it, and says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, ClassVar, Protocol

from loguru import logger

from cancel_scanner.engine.stage import distinct_names
from cancel_scanner.gateway.contract import NotSent

DEFAULT_CHANNEL = "wechat"  # what a row migrated from before channels existed holds
CHANNEL_NOT_SERVED = "CHANNEL_NOT_SERVED"


class Unserved:
    """The gateway of a channel this daemon does not serve: every call answers NotSent."""

    def __init__(self, name: str):
        self.name = name
        self._said = False
        self._lock = threading.Lock()

    def _not_sent(self, *_args: Any, **_kwargs: Any) -> NotSent:
        with self._lock:
            said, self._said = self._said, True
        if not said:
            logger.bind(stage="gateway", action="channel_not_served", channel=self.name).warning(
                "rows of payment channel {!r} are waiting: this daemon does not serve it", self.name
            )
        return NotSent(CHANNEL_NOT_SERVED, f"payment channel {self.name!r} is not served by this daemon: never sent")

    apply = query = query_payment = close_payment = _not_sent


class Channels:
    """The gateways of the channels this daemon serves, by name, as one gateway for the engine."""

    def __init__(self, gateways: Mapping[str, Any]):
        if not gateways:
            raise ValueError("at least one payment channel")
        self.gateways = dict(gateways)
        self._unserved: dict[str, Unserved] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.gateways)

    def channel(self, name: str | None) -> Any:
        """The gateway of channel ``name`` (a row's ``channel``; None: the default channel)."""
        name = name or DEFAULT_CHANNEL
        gateway = self.gateways.get(name)
        if gateway is None:
            gateway = self._unserved.setdefault(name, Unserved(name))
        return gateway

    # --- what the engine asks of the gateway ---------------------------------------------------

    def calls_within(self, endpoint: str, seconds: float) -> int | None:
        """The strictest budget of the channels that pace ``endpoint`` (None when none does): a batch
        may hold rows of any channel, so it takes no more than the slowest can start."""
        budgets = [
            b
            for b in (getattr(g, "calls_within", _unpaced)(endpoint, seconds) for g in self.gateways.values())
            if b is not None
        ]
        return min(budgets) if budgets else None

    def pace_share(self, heartbeat_seconds: float) -> Any:
        """The pace shared with the other processes of the one channel that shares its limits, or None."""
        for gateway in self.gateways.values():
            share = getattr(gateway, "pace_share", None)
            made = share(heartbeat_seconds) if share is not None else None
            if made is not None:
                return made
        return None

    def close(self) -> None:
        for gateway in self.gateways.values():
            close = getattr(gateway, "close", None)
            if close is not None:
                close()


def _unpaced(_endpoint: str, _seconds: float) -> None:
    return None


_LONE_UNSERVED: dict[str, Unserved] = {}


def route(gateway: Any, channel: str | None) -> Any:
    """The gateway a row of ``channel`` is called through: from ``Channels``, or a lone gateway (which
    serves the default channel only)."""
    if isinstance(gateway, Channels):
        return gateway.channel(channel)
    if (channel or DEFAULT_CHANNEL) == DEFAULT_CHANNEL:
        return gateway
    name = channel or DEFAULT_CHANNEL
    return _LONE_UNSERVED.setdefault(name, Unserved(name))  # one per name: it warns once, not per call


class Channel(Protocol):
    """A payment channel's declaration: its name (what rows hold) and how its gateway is built."""

    name: ClassVar[str]

    @classmethod
    def build(cls, config: Any, stack: ExitStack) -> Any:
        """The channel's gateway for ``config`` (its resources closed by ``stack``), or None when the
        configuration leaves the channel off."""


class ChannelRegistry:
    """The channels a daemon builds, each declared once; ``build`` makes their gateways from the config."""

    def __init__(self, classes: Sequence[type[Channel]]):
        self.classes = tuple(classes)
        self.names = distinct_names(classes, "payment channels")

    def with_channel(self, cls: type[Channel]) -> ChannelRegistry:
        """This registry with one more channel (a plug-in, a test's throwaway channel)."""
        return ChannelRegistry([*self.classes, cls])

    def build(self, config: Any, stack: ExitStack, *, built: Callable[[str, Any], None] | None = None) -> Channels:
        gateways = {}
        for cls in self.classes:
            gateway = cls.build(config, stack)
            if gateway is not None:  # a channel the configuration leaves off
                gateways[cls.name] = gateway
                if built is not None:
                    built(cls.name, gateway)
        return Channels(gateways)
