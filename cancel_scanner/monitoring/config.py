"""The `monitoring:` section of jobs.yaml: where the status page, /metrics, /healthz and /readyz are served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator

from cancel_scanner.engine.config import ConfigError, Section, Text, host_port, mapping, validated

ENV_MONITORING_TOKEN = "CANCEL_SCANNER_MONITORING_TOKEN"  # the page's and /metrics' key off loopback


class MonitoringConfig(Section):
    """The `monitoring:` section: where /metrics, /healthz and /readyz are served (off when absent).

    Off loopback, the page and /metrics are behind a token (CANCEL_SCANNER_MONITORING_TOKEN, from the
    environment only), unless ``allow_unauthenticated`` says otherwise out loud."""

    listen: Text | None = None
    refresh_seconds: Annotated[StrictFloat | StrictInt, Field(ge=1, le=3_600)] = 15
    allow_unauthenticated: StrictBool = False
    token: str | None = Field(default=None, exclude=True, repr=False)  # from the environment only

    @property
    def loopback(self) -> bool:
        from cancel_scanner.engine.net import is_loopback_host

        host = (self.listen or "").rpartition(":")[0].strip("[]")
        return is_loopback_host(host)

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str | None) -> str | None:
        return host_port(listen)


MONITORING_TOKEN_MIN_CHARS = 16


def monitoring_section(raw: Any, env: Mapping[str, str]) -> MonitoringConfig:
    data = dict(mapping(raw, "monitoring"))
    if "token" in data:
        raise ConfigError(
            "monitoring.token", f"is never read from the file: set {ENV_MONITORING_TOKEN} in the environment"
        )
    monitoring = validated(MonitoringConfig, data, "monitoring")
    token = env.get(ENV_MONITORING_TOKEN) or None
    if token is not None and len(token) < MONITORING_TOKEN_MIN_CHARS:
        raise ConfigError(
            ENV_MONITORING_TOKEN, f"must be at least {MONITORING_TOKEN_MIN_CHARS} characters (value not shown)"
        )
    if monitoring.listen and not monitoring.loopback and token is None and not monitoring.allow_unauthenticated:
        raise ConfigError(
            "monitoring.listen",
            f"{monitoring.listen} is not a loopback address: the status page and /metrics"
            f" show orders and refunds; set {ENV_MONITORING_TOKEN} (or"
            " monitoring.allow_unauthenticated: true)",
        )
    return monitoring.model_copy(update={"token": token}) if token else monitoring
