"""jobs.yaml, parsed once into one frozen, validated ``Config``.

Each section's model is declared by the package that owns it, with its defaults beside it:
``engine.config`` (the engine's keys and the pieces every model is built from), ``engine.settings``
and each stage (``jobs:``), ``gateway.wechat_config`` (``wechat:``), ``monitoring.config``,
``alerts.config``, ``operations.config`` (``reconcile:``, ``prune:``). This module puts them together.
Every problem is a ``ConfigError`` that names the key, so the CLI can print one line and exit 2.
Secrets never live in the file: the APIv3 key comes from the environment, private keys from files,
and neither is ever echoed in an error. ``cancel-scanner config --defaults`` prints the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from cancel_scanner.alerts.config import AlertsConfig, alerts_section
from cancel_scanner.engine.config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    DEFAULT_TAKEOVER_SECONDS,
    DEFAULT_WSREP_SYNC_WAIT,
    ENV_DB_URL,
    LEASE_SAFETY_MARGIN_SECONDS,
    ConfigError,
    Section,
    Text,
    mapping,
    reject_unknown,
    validated,
)
from cancel_scanner.engine.settings import GatewayJobSettings, JobSettings, validate_job
from cancel_scanner.gateway.wechat_config import WeChatConfig, check_live
from cancel_scanner.i18n import DEFAULT_DISPLAY_TIMEZONE, DEFAULT_LOCALE, Locale
from cancel_scanner.monitoring.config import MonitoringConfig, monitoring_section
from cancel_scanner.operations.config import PruneConfig, ReconcileConfig

ENV_CONFIG = "CANCEL_SCANNER_CONFIG"
ENV_ALLOW_SANDBOX = "CANCEL_SCANNER_ALLOW_SANDBOX"
DEFAULT_CONFIG_PATH = Path("jobs.yaml")


LogLevel = Annotated[
    Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"],
    BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v),
]


class _TopLevel(Section):
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
    # what people read (result_msg, the page, status, alerts): zh_CN or en; logs stay English
    locale: Locale = DEFAULT_LOCALE
    display_timezone: Text = DEFAULT_DISPLAY_TIMEZONE  # times shown to people; stored times stay UTC

    @field_validator("display_timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"not a time zone this machine knows (e.g. Asia/Shanghai): {zone!r}") from None
        return zone


class Config(BaseModel):
    """jobs.yaml, validated: every section's model, each declared by the package that owns it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    database_url: str = Field(default=DEFAULT_DATABASE_URL, repr=False)  # may hold the password: never in a repr
    wechat: WeChatConfig = WeChatConfig()
    jobs: Mapping[str, JobSettings] = Field(default_factory=lambda: MappingProxyType({}))
    monitoring: MonitoringConfig = MonitoringConfig()
    alerts: AlertsConfig = AlertsConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    prune: PruneConfig = PruneConfig()
    log_json: bool = False
    log_level: str = "INFO"
    shutdown_timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    wsrep_sync_wait: int = DEFAULT_WSREP_SYNC_WAIT
    locale: str = DEFAULT_LOCALE
    display_timezone: str = DEFAULT_DISPLAY_TIMEZONE
    source: str = Field(default="<defaults>", exclude=True)

    @field_validator("jobs", mode="after")
    @classmethod
    def _read_only(cls, jobs: Mapping[str, JobSettings]) -> Mapping[str, JobSettings]:
        return MappingProxyType(dict(jobs))  # a job is never added, removed or replaced once parsed

    def job(self, name: str) -> JobSettings:
        return self.jobs[name]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def effective(self) -> dict[str, Any]:
        """Every key with the value this configuration runs with (defaults included), as jobs.yaml
        would spell it; secrets (the monitoring token, the alert secret) are never in it."""
        from sqlalchemy.engine import make_url

        data = self.model_dump(mode="json", exclude={"jobs"})
        data["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        data["jobs"] = {name: job.model_dump(mode="json") for name, job in self.jobs.items()}
        if data["alerts"].get("webhook_url"):
            data["alerts"]["webhook_url"] = "(set: not shown, it holds the robot's key)"
        return data


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
    data = mapping(raw, "<top level>")
    top = validated(_TopLevel, data, "")
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
                "locale",
                "display_timezone",
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

    wechat = validated(WeChatConfig, mapping(top.wechat, "wechat"), "wechat")
    if wechat.mode == "live":
        wechat = check_live(wechat, base, env)
    elif not url.startswith("sqlite") and env.get(ENV_ALLOW_SANDBOX) != "1":
        raise ConfigError(
            "wechat.mode",
            f"sandbox never moves money and refuses a non-SQLite database; set {ENV_ALLOW_SANDBOX}=1 if you mean it",
        )
    kw["wechat"] = wechat
    kw["monitoring"] = monitoring_section(top.monitoring, env)
    kw["alerts"] = alerts_section(top.alerts, env)
    kw["reconcile"] = validated(ReconcileConfig, mapping(top.reconcile, "reconcile"), "reconcile")
    kw["prune"] = validated(PruneConfig, mapping(top.prune, "prune"), "prune")
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
    jobs_raw = mapping(data.get("jobs"), "jobs")
    reject_unknown(jobs_raw, set(stages.names), "jobs")
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
