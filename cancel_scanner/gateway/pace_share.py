"""One merchant's limits shared by its processes: the gateway's pacer, told who is alive.

The engine's registry publishes, at every reap, how many live processes share this process's pace
group (the merchant) and the limits each was configured with; ``PaceShare.on_share`` turns that into
the pacer's rates (``share_pace``). The engine knows nothing of it but ``ready`` (the processes have
been counted at least once) and ``disagreement`` (for the config_error alert).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

from cancel_scanner.engine.registry import encode_limits


class PaceShare:
    def __init__(self, gateway: Any, group: str, heartbeat_seconds: float):
        self.gateway = gateway  # share_pace(sharers, hold_seconds=, limits=), held_for(endpoint)
        self.group = group
        self.limits: dict[str, float] = dict(gateway.pace_limits())  # as this process was configured: published
        self.heartbeat_seconds = heartbeat_seconds
        self._sharers: int | None = None  # None until the first reap has counted who shares our pace
        self._strictest: dict[str, float] | None = None  # the strictest limits of our group, as last paced at
        # Set while the processes of our merchant were configured with different limits: says who (the
        # config_error alert reads it); None when they agree.
        self.disagreement: str | None = None

    @property
    def ready(self) -> bool:
        """The merchant's processes have been counted: calls may start at our share."""
        return self._sharers is not None

    def held_for(self, endpoint: str) -> float:
        return float(self.gateway.held_for(endpoint))

    def on_share(self, sharers: int, fresh: bool, peers: Sequence[tuple[str, Mapping[str, float]]] = ()) -> None:
        """After every reap: pace at our share of the merchant's QPS. A newcomer among others holds its
        calls for two heartbeats, by which time every other process has read its entry and slowed down.

        The processes of one merchant may have been configured with different limits: each paces at
        the strictest any of them published, and says so (WARNING, the config_error alert)."""
        limits = dict(self.limits)
        for _who, published in peers:
            for endpoint, qps in published.items():
                if endpoint in limits:
                    limits[endpoint] = min(limits[endpoint], qps)
        self._note_disagreement(peers, strictest_changed=limits != self._strictest)
        hold = 2 * self.heartbeat_seconds if fresh and sharers > 1 else 0.0
        if sharers == self._sharers and limits == self._strictest and not fresh:
            return
        paces = self.gateway.share_pace(sharers, hold_seconds=hold, limits=limits)
        if sharers != self._sharers or limits != self._strictest:
            logger.bind(stage="pace", action="pace_shared", sharers=sharers).info(
                "the merchant's limits shared by {} process(es): {}",
                sharers,
                ", ".join(f"{endpoint} {qps:.3g}/s" for endpoint, qps in paces.items()),
            )
        self._sharers, self._strictest = sharers, limits

    def _note_disagreement(self, peers: Sequence[tuple[str, Mapping[str, float]]], *, strictest_changed: bool) -> None:
        """One WARNING when this merchant's processes start to disagree on its limits (and again only if
        the strictest changes); the text names every process that differs, for the config_error alert."""
        ours = self.limits
        mine = encode_limits(ours)  # compared as published (qps:g), or rounding alone would look like a difference
        differ = {who: published for who, published in peers if published and encode_limits(published) != mine}
        said = None
        if differ:
            said = "; ".join(f"{who} {_limits_text(published)}" for who, published in sorted(differ.items()))
            said = (
                f"processes of merchant {self.group} were configured with other limits than this"
                f" one's ({_limits_text(ours)}): {said}; all pace at the strictest"
            )
            if self.disagreement is None or strictest_changed:
                logger.bind(stage="pace", action="pace_limits_differ", hosts=sorted(differ)).warning("{}", said)
        elif self.disagreement is not None:
            logger.bind(stage="pace", action="pace_limits_agree").info(
                "the merchant's processes agree on its limits again"
            )
        self.disagreement = said


def _limits_text(limits: Mapping[str, float]) -> str:
    return ", ".join(f"{endpoint} {qps:g}/s" for endpoint, qps in sorted(limits.items())) or "none"
