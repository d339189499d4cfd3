"""jobs.yaml, parsed once into frozen, validated objects.

Every problem is a ``ConfigError`` that names the key (``jobs.intake.batch_size``)
so the CLI can print one line and exit 2. Secrets never live in the file: the
APIv3 key comes from the environment, private keys from files, and neither is
ever echoed in an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from cancel_scanner.engine.net import is_loopback_host, is_safe_gateway_url
from cancel_scanner.engine.settings import (
    ConfigError,
    GatewayJobSettings,
    JobSettings,
    Seconds,
    config_error,
    validate_job,
)

ENV_CONFIG = "CANCEL_SCANNER_CONFIG"
ENV_DB_URL = "CANCEL_SCANNER_DB_URL"
ENV_ALLOW_SANDBOX = "CANCEL_SCANNER_ALLOW_SANDBOX"
ENV_APIV3_KEY = "WECHATPAY_APIV3_KEY"
# Alert webhooks carry their secret in the URL (WeCom's key, DingTalk's access_token, Feishu's hook
# id): the URL may come from the environment instead of the file, and a signing secret only does.
ENV_ALERT_WEBHOOK_URL = "CANCEL_SCANNER_ALERT_WEBHOOK_URL"
ENV_MONITORING_TOKEN = "CANCEL_SCANNER_MONITORING_TOKEN"  # the page's and /metrics' key off loopback
ENV_ALERT_SECRET = "CANCEL_SCANNER_ALERT_SECRET"  # DingTalk's or Feishu's signing secret
DEFAULT_CONFIG_PATH = Path("jobs.yaml")

# Defaults, each with its unit in the name.
DEFAULT_DATABASE_URL = "sqlite:///cancel-scanner.db"
LEASE_SAFETY_MARGIN_SECONDS = 2.0  # every gateway call is over this long before its lease ends
DEFAULT_TAKEOVER_SECONDS = 10.0  # a process silent this long is dead: survivors release its leases
DEFAULT_HEARTBEAT_SECONDS = 1.0
# On a Galera node, reads (1) and UPDATE/DELETE (2) wait until the node has applied every write the
# cluster committed before them; without, a daemon whose connection moved to another node may act on
# its own earlier writes not yet applied there. See docs/concurrency.md, Galera.
DEFAULT_WSREP_SYNC_WAIT = 3
DEFAULT_APPLY_QPS = 150.0
DEFAULT_QUERY_QPS = 300.0
DEFAULT_PAY_QUERY_QPS = 100.0  # payment query and close: no published figure; a conservative pace
DEFAULT_PAY_CLOSE_QPS = 50.0
DEFAULT_TIMEOUT_SECONDS = (5.0, 15.0)
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0
DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS = 2.0
WECHAT_DEFAULT_BASE_URL = "https://api.mch.weixin.qq.com"


JobConfig = JobSettings  # what the engine reads of a stage's job; each stage may declare a richer model


def _text(value: Any) -> Any:
    # YAML reads an unquoted mchid as a number; it is still the text the merchant wrote.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value.strip() if isinstance(value, str) else value


Text = Annotated[StrictStr, BeforeValidator(_text), Field(min_length=1)]
Positive = Annotated[StrictFloat | StrictInt, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SandboxConfig(_Section):
    port: Annotated[StrictInt, Field(ge=0, le=65_535)] = 0
    success_delay_seconds: Seconds = DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS


class WeChatConfig(_Section):
    """The `wechat:` section. Shapes and types here; the rules of live mode in ``_check_live``."""

    mode: Literal["sandbox", "live"] = "sandbox"
    base_url: Text = WECHAT_DEFAULT_BASE_URL
    mchid: Text = "1900000001"
    appid: Text = "wx0000000000000000"
    merchant_serial_no: Text | None = None
    merchant_private_key_file: Path | None = None
    platform_public_key_file: Path | None = None
    platform_public_key_id: Text | None = None
    notify_url: Text | None = None
    notify_listen: Text | None = None
    apply_qps: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10_000)] = DEFAULT_APPLY_QPS
    query_qps: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10_000)] = DEFAULT_QUERY_QPS
    pay_query_qps: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10_000)] = DEFAULT_PAY_QUERY_QPS
    pay_close_qps: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10_000)] = DEFAULT_PAY_CLOSE_QPS
    # The paces above are the merchant's: every live process of this mchid takes an equal share.
    # False: each process paces at them alone (one daemon per merchant, or limits split by hand).
    qps_shared: StrictBool = True
    timeout_seconds: tuple[Annotated[Positive, Field(le=300)], Annotated[Positive, Field(le=300)]] = (
        DEFAULT_TIMEOUT_SECONDS
    )
    sandbox: SandboxConfig = SandboxConfig()

    @field_validator("sandbox", mode="before")
    @classmethod
    def _empty_sandbox(cls, value: Any) -> Any:
        return {} if value is None else value  # `sandbox:` with nothing under it: the defaults

    @field_validator("merchant_private_key_file", "platform_public_key_file", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        value = _text(value)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError("must be a file path")
        return Path(value).expanduser() if value else None

    @field_validator("notify_url")
    @classmethod
    def _https_without_query(cls, url: str | None) -> str | None:
        parts = urlsplit(url) if url else None
        if parts is not None and (parts.scheme != "https" or not parts.hostname or parts.query):
            raise ValueError("must be an https URL without a query string")
        return url

    @field_validator("notify_listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        return _host_port(listen)


def _host_port(listen: str | None) -> str | None:
    if listen is not None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
            raise ValueError(f"must be HOST:PORT, got {listen!r}")
    return listen


class MonitoringConfig(_Section):
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
        return _host_port(listen)


def _clock_time(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 10:00 as 600 (sexagesimal)
        value = f"{value // 60:02d}:{value % 60:02d}"
    if (
        not isinstance(value, str)
        or len(value) != 5
        or value[2] != ":"
        or not (value[:2] + value[3:]).isdigit()
        or int(value[:2]) > 23
        or int(value[3:]) > 59
    ):
        raise ValueError("must be a time of day HH:MM")
    return value


ClockTime = Annotated[str, BeforeValidator(_clock_time)]


class _Rule(_Section):
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


class AlertRules(_Section):
    gateway_failure_rate: GatewayFailureRule = GatewayFailureRule()
    rows_failed: CountRule = CountRule()
    oldest_pending: OldestPendingRule = OldestPendingRule()
    abnormal_refunds: CountRule = CountRule()
    channel_facts: CountRule = CountRule()
    stage_down: StageDownRule = StageDownRule()
    config_error: ConfigErrorRule = ConfigErrorRule()
    reconcile: ReconcileRule = ReconcileRule()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_rule(cls, value: Any) -> Any:
        return {} if value is None else value  # `rows_failed:` with nothing under it: the defaults


class ReconcileConfig(_Section):
    """The `reconcile:` section: the daily job comparing WeChat Pay's bill of yesterday with the tables."""

    enabled: StrictBool = True
    at: ClockTime = "10:00"  # Beijing time: WeChat's bill of yesterday exists from about 10:00
    retry_minutes: Annotated[StrictFloat | StrictInt, Field(ge=1, le=720)] = 30  # STATEMENT_CREATING: try again
    # A payment for an order cancelled here without a refund (its stock given back: the user paid for
    # nothing): booked and refunded once, by default; false only reports it.
    refund_orphan_payments: StrictBool = True


class PruneConfig(_Section):
    """The `prune:` section: moving finished rows into the archive tables, as `prune` or a daily job."""

    enabled: StrictBool = False  # the daily job; `cancel-scanner prune` works either way
    at: ClockTime = "04:00"  # Beijing time
    older_than_days: Annotated[StrictInt, Field(ge=1, le=36_500)] = 90
    batch_size: Annotated[StrictInt, Field(ge=1, le=10_000)] = 500


class AlertsConfig(_Section):
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


MONITORING_TOKEN_MIN_CHARS = 16


def _monitoring(raw: Any, env: Mapping[str, str]) -> MonitoringConfig:
    data = dict(_mapping(raw, "monitoring"))
    if "token" in data:
        raise ConfigError(
            "monitoring.token", f"is never read from the file: set {ENV_MONITORING_TOKEN} in the environment"
        )
    monitoring = _validated(MonitoringConfig, data, "monitoring")
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


def _alerts(raw: Any, env: Mapping[str, str]) -> AlertsConfig:
    data = dict(_mapping(raw, "alerts"))
    if "secret" in data:
        raise ConfigError("alerts.secret", f"is never read from the file: set {ENV_ALERT_SECRET} in the environment")
    if env.get(ENV_ALERT_WEBHOOK_URL):
        data["webhook_url"] = env[ENV_ALERT_WEBHOOK_URL]
    alerts = _validated(AlertsConfig, data, "alerts")
    secret = env.get(ENV_ALERT_SECRET) or None
    return alerts.model_copy(update={"secret": secret}) if secret else alerts


LogLevel = Annotated[
    Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"],
    BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v),
]


class _TopLevel(_Section):
    """The top level of jobs.yaml; `wechat` and `jobs` are validated by their own models."""

    database_url: Text = DEFAULT_DATABASE_URL
    wechat: Any = None
    jobs: Any = None
    monitoring: Any = None
    alerts: Any = None
    reconcile: Any = None
    prune: Any = None
    log_json: StrictBool = False
    log_level: LogLevel = "INFO"
    shutdown_timeout_seconds: Annotated[StrictFloat | StrictInt, Field(ge=1, le=3_600)] = (
        DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    )
    takeover_seconds: Annotated[StrictFloat | StrictInt, Field(ge=3, le=3_600)] = DEFAULT_TAKEOVER_SECONDS
    heartbeat_seconds: Annotated[StrictFloat | StrictInt, Field(ge=0.1, le=600)] = DEFAULT_HEARTBEAT_SECONDS
    wsrep_sync_wait: Annotated[StrictInt, Field(ge=0, le=15)] = DEFAULT_WSREP_SYNC_WAIT


@dataclass(frozen=True)
class Config:
    database_url: str = DEFAULT_DATABASE_URL
    wechat: WeChatConfig = field(default_factory=WeChatConfig)
    jobs: Mapping[str, JobSettings] = field(default_factory=lambda: MappingProxyType({}))
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    log_json: bool = False
    log_level: str = "INFO"
    shutdown_timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    wsrep_sync_wait: int = DEFAULT_WSREP_SYNC_WAIT
    source: str = "<defaults>"

    def job(self, name: str) -> JobSettings:
        return self.jobs[name]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(data: dict, allowed: set[str], prefix: str) -> None:
    for k in data:
        if k not in allowed:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _readable(path: Path, key: str, base: Path) -> Path:
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"file not readable: {path}")
    return path


def _check_live(wechat: WeChatConfig, base: Path, env: Mapping[str, str]) -> WeChatConfig:
    """Live mode's rules: a safe gateway URL, the keys WeChat needs, readable key files, the APIv3 key."""
    parts = urlsplit(wechat.base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError("wechat.base_url", f"must be an http(s) URL, got {wechat.base_url!r}")
    if not is_safe_gateway_url(wechat.base_url):
        raise ConfigError("wechat.base_url", "plain http is allowed only for loopback hosts; use https")
    for name in (
        "merchant_serial_no",
        "platform_public_key_id",
        "merchant_private_key_file",
        "platform_public_key_file",
    ):
        if getattr(wechat, name) is None:
            raise ConfigError(f"wechat.{name}", "required in live mode")
    files = {
        name: _readable(getattr(wechat, name), f"wechat.{name}", base)
        for name in ("merchant_private_key_file", "platform_public_key_file")
    }
    if len(env.get(ENV_APIV3_KEY, "").encode()) != 32:
        # Never echo the value: only whether it is there and how long it is.
        raise ConfigError(ENV_APIV3_KEY, "must be set to the 32-byte APIv3 key in live mode")
    return wechat.model_copy(update={"base_url": wechat.base_url.rstrip("/"), **files})


def _validated(model: type[BaseModel], data: dict, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(prefix, exc) from None


def parse_config(
    raw: Any,
    stages: Any,
    *,
    source: str = "<memory>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate a loaded YAML document for ``stages`` (a StageRegistry). ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    base = base_dir or Path.cwd()
    data = _mapping(raw, "<top level>")
    top = _validated(_TopLevel, data, "")
    kw: dict[str, Any] = {
        "source": source,
        **{
            k: getattr(top, k)
            for k in (
                "log_json",
                "log_level",
                "shutdown_timeout_seconds",
                "takeover_seconds",
                "heartbeat_seconds",
                "wsrep_sync_wait",
            )
        },
    }
    if top.heartbeat_seconds > top.takeover_seconds / 3:
        raise ConfigError(
            "heartbeat_seconds", f"must be at most a third of takeover_seconds ({top.takeover_seconds:g} s)"
        )

    url, key = (env[ENV_DB_URL], ENV_DB_URL) if env.get(ENV_DB_URL) else (top.database_url, "database_url")
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - whatever make_url raises, the URL is not valid
        raise ConfigError(key, "is not a valid SQLAlchemy URL") from None
    if parsed.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
        raise ConfigError(key, f"unsupported database {parsed.get_backend_name()!r}: use sqlite or mysql+pymysql")
    kw["database_url"] = url

    wechat = _validated(WeChatConfig, _mapping(top.wechat, "wechat"), "wechat")
    if wechat.mode == "live":
        wechat = _check_live(wechat, base, env)
    elif not url.startswith("sqlite") and env.get(ENV_ALLOW_SANDBOX) != "1":
        raise ConfigError(
            "wechat.mode",
            f"sandbox never moves money and refuses a non-SQLite database; set {ENV_ALLOW_SANDBOX}=1 if you mean it",
        )
    kw["wechat"] = wechat
    kw["monitoring"] = _monitoring(top.monitoring, env)
    kw["alerts"] = _alerts(top.alerts, env)
    kw["reconcile"] = _validated(ReconcileConfig, _mapping(top.reconcile, "reconcile"), "reconcile")
    kw["prune"] = _validated(PruneConfig, _mapping(top.prune, "prune"), "prune")
    oldest = kw["alerts"].rules.oldest_pending
    unknown = set(oldest.stage_threshold_seconds) - set(stages.names)
    if unknown:
        raise ConfigError(
            "alerts.rules.oldest_pending.stage_threshold_seconds", f"no such stage: {', '.join(sorted(unknown))}"
        )
    oldest = oldest.model_copy(
        update={"stage_threshold_seconds": {**stages.alert_thresholds(), **oldest.stage_threshold_seconds}}
    )
    rules = kw["alerts"].rules.model_copy(update={"oldest_pending": oldest})
    kw["alerts"] = kw["alerts"].model_copy(update={"rules": rules})

    data = {"jobs": top.jobs}
    jobs_raw = _mapping(data.get("jobs"), "jobs")
    _reject_unknown(jobs_raw, set(stages.names), "jobs")
    jobs = {name: validate_job(stages.settings(name), name, jobs_raw.get(name)) for name in stages.names}
    kw["jobs"] = MappingProxyType(jobs)
    for name, job in jobs.items():
        if isinstance(job, GatewayJobSettings):
            # A call starts only if it can finish inside the lease; a shorter lease would start none.
            need = sum(wechat.timeout_seconds) + LEASE_SAFETY_MARGIN_SECONDS
            if job.lease_seconds <= need:
                raise ConfigError(
                    f"jobs.{name}.lease_seconds",
                    f"must be more than wechat.timeout_seconds (connect + read) + {LEASE_SAFETY_MARGIN_SECONDS:g} s = {need:g}",
                )
    return Config(**kw)


def resolve_config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    if cli_path:
        return Path(cli_path)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(path: Path | None, stages: Any, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``; with no path, the built-in defaults (sandbox, SQLite)."""
    if path is None:
        return parse_config({}, stages, source="<defaults>", env=env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"is not valid YAML{where}") from None
    return parse_config(raw, stages, source=str(path), base_dir=Path(path).resolve().parent, env=env)
