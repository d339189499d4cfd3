"""The `alerts:` section of jobs.yaml: the rules the daemon evaluates and the group robot it posts to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator

from cancel_scanner.engine.config import ClockTime, ConfigError, Section, Text, mapping, validated
from cancel_scanner.engine.net import is_loopback_host

# Alert webhooks carry their secret in the URL (WeCom's key, DingTalk's access_token, Feishu's hook
# id): the URL may come from the environment instead of the file, and a signing secret only does.
ENV_ALERT_WEBHOOK_URL = "CANCEL_SCANNER_ALERT_WEBHOOK_URL"
ENV_ALERT_SECRET = "CANCEL_SCANNER_ALERT_SECRET"  # DingTalk's or Feishu's signing secret


class _Rule(Section):
    enabled: StrictBool = True


class GatewayFailureRule(_Rule):
    """WeChat answers that were no answer (unknown, retry later, configuration errors) over a window."""

    threshold: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] = 0.5
    window_seconds: Annotated[StrictFloat | StrictInt, Field(ge=10, le=86_400)] = 300
    min_calls: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 20


class CountRule(_Rule):
    threshold: Annotated[StrictInt, Field(ge=1, le=1_000_000_000)] = 1


class OldestPendingRule(_Rule):
    """A stage's oldest pending row older than this; refunds to a bank card take days, hence per stage."""

    threshold_seconds: Annotated[StrictFloat | StrictInt, Field(ge=1, le=30 * 86_400)] = 900
    # Stages whose rows wait longer by nature declare their own (Stage.oldest_pending_alert_seconds);
    # what is configured here is laid over those.
    stage_threshold_seconds: dict[str, Annotated[StrictFloat | StrictInt, Field(ge=1, le=30 * 86_400)]] = Field(
        default_factory=dict
    )


class StageDownRule(_Rule):
    for_seconds: Annotated[StrictFloat | StrictInt, Field(ge=0, le=86_400)] = 120


class ConfigErrorRule(_Rule):
    """A configuration answer from WeChat (SIGN_ERROR, a bad certificate) in the window, or the clock off."""

    window_seconds: Annotated[StrictFloat | StrictInt, Field(ge=10, le=86_400)] = 300
    clock_skew_seconds: Annotated[StrictFloat | StrictInt, Field(gt=0, le=3_600)] = 60


class ReconcileRule(_Rule):
    """Yesterday not reconciled by ``deadline`` (Beijing time), or the last reconciliation found differences or failed."""

    deadline: ClockTime = "18:00"


class AlertRules(Section):
    gateway_failure_rate: GatewayFailureRule = GatewayFailureRule()
    rows_failed: CountRule = CountRule()
    oldest_pending: OldestPendingRule = OldestPendingRule()
    abnormal_refunds: CountRule = CountRule()
    channel_facts: CountRule = CountRule()
    ship_due: CountRule = CountRule()
    stage_down: StageDownRule = StageDownRule()
    config_error: ConfigErrorRule = ConfigErrorRule()
    reconcile: ReconcileRule = ReconcileRule()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_rule(cls, value: Any) -> Any:
        return {} if value is None else value  # `rows_failed:` with nothing under it: the defaults


class AlertsConfig(Section):
    """The `alerts:` section: rules evaluated by the daemon, messages posted to a group robot (off without a URL)."""

    webhook_url: Text | None = Field(default=None, repr=False)  # holds the robot's key
    format: Literal["wecom", "dingtalk", "feishu", "json"] = "json"
    cooldown_seconds: Annotated[StrictFloat | StrictInt, Field(ge=0, le=86_400)] = 600
    timeout_seconds: Annotated[StrictFloat | StrictInt, Field(gt=0, le=60)] = 5
    rules: AlertRules = AlertRules()
    secret: str | None = Field(default=None, exclude=True, repr=False)  # from the environment only

    @field_validator("rules", mode="before")
    @classmethod
    def _empty_rules(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _http_url(cls, url: Any) -> Any:
        # Never echo the value: it holds the robot's key.
        if url is None:
            return None
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an https:// URL (value not shown: it holds the robot's key)")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError("must be https:// (plain http only to a loopback address): the URL holds the robot's key")
        return url


def alerts_section(raw: Any, env: Mapping[str, str]) -> AlertsConfig:
    data = dict(mapping(raw, "alerts"))
    if "secret" in data:
        raise ConfigError("alerts.secret", f"is never read from the file: set {ENV_ALERT_SECRET} in the environment")
    if env.get(ENV_ALERT_WEBHOOK_URL):
        data["webhook_url"] = env[ENV_ALERT_WEBHOOK_URL]
    alerts = validated(AlertsConfig, data, "alerts")
    secret = env.get(ENV_ALERT_SECRET) or None
    return alerts.model_copy(update={"secret": secret}) if secret else alerts
