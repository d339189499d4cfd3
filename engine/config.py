"""jobs.yaml, parsed once into frozen, validated objects.

Every problem is a ``ConfigError`` that names the key (``jobs.intake.batch_size``)
so the CLI can print one line and exit 2. Secrets never live in the file: the
APIv3 key comes from the environment, private keys from files, and neither is
ever echoed in an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from engine.net import is_safe_gateway_url
from engine.settings import ConfigError, GatewayJobSettings, JobSettings, validate_job

ENV_CONFIG = "CANCEL_SCANNER_CONFIG"
ENV_DB_URL = "CANCEL_SCANNER_DB_URL"
ENV_ALLOW_SANDBOX = "CANCEL_SCANNER_ALLOW_SANDBOX"
ENV_APIV3_KEY = "WECHATPAY_APIV3_KEY"
DEFAULT_CONFIG_PATH = Path("jobs.yaml")

# Defaults, each with its unit in the name.
DEFAULT_DATABASE_URL = "sqlite:///cancel-scanner.db"
LEASE_SAFETY_MARGIN_SECONDS = 2.0  # every gateway call is over this long before its lease ends
DEFAULT_TAKEOVER_SECONDS = 10.0  # a process silent this long is dead: survivors release its leases
DEFAULT_HEARTBEAT_SECONDS = 1.0
DEFAULT_APPLY_QPS = 150.0
DEFAULT_QUERY_QPS = 300.0
DEFAULT_TIMEOUT_SECONDS = (5.0, 15.0)
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0
DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS = 2.0
WECHAT_DEFAULT_BASE_URL = "https://api.mch.weixin.qq.com"


JobConfig = JobSettings  # what the engine reads of a stage's job; each stage may declare a richer model


@dataclass(frozen=True)
class SandboxConfig:
    port: int = 0
    success_delay_seconds: float = DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS


@dataclass(frozen=True)
class WeChatConfig:
    mode: str = "sandbox"
    base_url: str = WECHAT_DEFAULT_BASE_URL
    mchid: str = "1900000001"
    appid: str = "wx0000000000000000"
    merchant_serial_no: str | None = None
    merchant_private_key_file: Path | None = None
    platform_public_key_file: Path | None = None
    platform_public_key_id: str | None = None
    notify_url: str | None = None
    notify_listen: str | None = None
    apply_qps: float = DEFAULT_APPLY_QPS
    query_qps: float = DEFAULT_QUERY_QPS
    timeout_seconds: tuple[float, float] = DEFAULT_TIMEOUT_SECONDS
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass(frozen=True)
class Config:
    database_url: str = DEFAULT_DATABASE_URL
    wechat: WeChatConfig = field(default_factory=WeChatConfig)
    jobs: Mapping[str, JobSettings] = field(default_factory=lambda: MappingProxyType({}))
    log_json: bool = False
    log_level: str = "INFO"
    shutdown_timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    takeover_seconds: float = DEFAULT_TAKEOVER_SECONDS
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    source: str = "<defaults>"

    def job(self, name: str) -> JobSettings:
        return self.jobs[name]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


# --- small typed readers: each names the key it complains about ----------------------------------


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


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi}, got {value}")
    return value


def _number(value: Any, key: str, lo: float, hi: float = float("inf"), lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ConfigError(key, f"must be {bound}" + (f" and <= {hi}" if hi != float("inf") else "") + f", got {value}")
    return float(value)


def _str(value: Any, key: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _delays(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"must be a non-empty list of seconds, got {value!r}")
    return tuple(_number(v, f"{key}[{i}]", 0) for i, v in enumerate(value))


# --- sections -----------------------------------------------------------------------------------

def _readable_file(value: Any, key: str, base: Path) -> Path:
    path = Path(_str(value, key)).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"file not readable: {path}")
    return path


_WECHAT_KEYS = {
    "mode",
    "base_url",
    "mchid",
    "appid",
    "merchant_serial_no",
    "merchant_private_key_file",
    "platform_public_key_file",
    "platform_public_key_id",
    "notify_url",
    "notify_listen",
    "apply_qps",
    "query_qps",
    "timeout_seconds",
    "sandbox",
}


def _parse_wechat(raw: Any, base: Path, env: Mapping[str, str]) -> WeChatConfig:
    data = _mapping(raw, "wechat")
    _reject_unknown(data, _WECHAT_KEYS, "wechat")
    kw: dict[str, Any] = {}
    mode = data.get("mode", "sandbox")
    if mode not in ("sandbox", "live"):
        raise ConfigError("wechat.mode", f"must be 'sandbox' or 'live', got {mode!r}")
    kw["mode"] = mode
    for name in ("mchid", "appid", "merchant_serial_no", "platform_public_key_id"):
        if name in data:
            kw[name] = _str(data[name], f"wechat.{name}")
    if "apply_qps" in data:
        kw["apply_qps"] = _number(data["apply_qps"], "wechat.apply_qps", 0, 10_000, lo_open=True)
    if "query_qps" in data:
        kw["query_qps"] = _number(data["query_qps"], "wechat.query_qps", 0, 10_000, lo_open=True)
    if "timeout_seconds" in data:
        t = data["timeout_seconds"]
        if not isinstance(t, list) or len(t) != 2:
            raise ConfigError("wechat.timeout_seconds", f"must be [connect, read] in seconds, got {t!r}")
        kw["timeout_seconds"] = (
            _number(t[0], "wechat.timeout_seconds[0]", 0, 300, lo_open=True),
            _number(t[1], "wechat.timeout_seconds[1]", 0, 300, lo_open=True),
        )
    if data.get("notify_url") is not None:
        url = _str(data["notify_url"], "wechat.notify_url")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.query:
            raise ConfigError("wechat.notify_url", "must be an https URL without a query string")
        kw["notify_url"] = url
    if data.get("notify_listen") is not None:
        listen = _str(data["notify_listen"], "wechat.notify_listen")
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError("wechat.notify_listen", f"must be HOST:PORT, got {listen!r}")
        kw["notify_listen"] = listen
    sandbox = _mapping(data.get("sandbox"), "wechat.sandbox")
    _reject_unknown(sandbox, {"port", "success_delay_seconds"}, "wechat.sandbox")
    skw: dict[str, Any] = {}
    if "port" in sandbox:
        skw["port"] = _int(sandbox["port"], "wechat.sandbox.port", 0, 65535)
    if "success_delay_seconds" in sandbox:
        skw["success_delay_seconds"] = _number(sandbox["success_delay_seconds"], "wechat.sandbox.success_delay_seconds", 0)
    kw["sandbox"] = SandboxConfig(**skw)

    if mode == "live":
        base_url = _str(data.get("base_url", WECHAT_DEFAULT_BASE_URL), "wechat.base_url")
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError("wechat.base_url", f"must be an http(s) URL, got {base_url!r}")
        if not is_safe_gateway_url(base_url):
            raise ConfigError("wechat.base_url", "plain http is allowed only for loopback hosts; use https")
        kw["base_url"] = base_url.rstrip("/")
        for name in ("merchant_serial_no", "platform_public_key_id"):
            if name not in kw:
                raise ConfigError(f"wechat.{name}", "required in live mode")
        for name in ("merchant_private_key_file", "platform_public_key_file"):
            if data.get(name) is None:
                raise ConfigError(f"wechat.{name}", "required in live mode")
            kw[name] = _readable_file(data[name], f"wechat.{name}", base)
        apiv3 = env.get(ENV_APIV3_KEY, "")
        if len(apiv3.encode()) != 32:
            # Never echo the value: only whether it is there and how long it is.
            raise ConfigError(ENV_APIV3_KEY, "must be set to the 32-byte APIv3 key in live mode")
    elif "base_url" in data:
        _str(data["base_url"], "wechat.base_url")
    return WeChatConfig(**kw)


_TOP_KEYS = {
    "database_url", "wechat", "jobs", "log_json", "log_level", "shutdown_timeout_seconds", "takeover_seconds",
    "heartbeat_seconds",
}
_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR")


def parse_config(
    raw: Any, stages: Any, *, source: str = "<memory>", base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Validate a loaded YAML document for ``stages`` (a StageRegistry). ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    base = base_dir or Path.cwd()
    data = _mapping(raw, "<top level>")
    _reject_unknown(data, _TOP_KEYS, "")
    kw: dict[str, Any] = {"source": source}

    url = env.get(ENV_DB_URL) or data.get("database_url", DEFAULT_DATABASE_URL)
    key = ENV_DB_URL if env.get(ENV_DB_URL) else "database_url"
    url = _str(url, key)
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        raise ConfigError(key, "is not a valid SQLAlchemy URL") from None
    if parsed.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
        raise ConfigError(key, f"unsupported database {parsed.get_backend_name()!r}: use sqlite or mysql+pymysql")
    kw["database_url"] = url

    if "log_json" in data:
        kw["log_json"] = _bool(data["log_json"], "log_json")
    if "log_level" in data:
        level = _str(data["log_level"], "log_level").upper()
        if level not in _LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        kw["log_level"] = level
    if "shutdown_timeout_seconds" in data:
        kw["shutdown_timeout_seconds"] = _number(data["shutdown_timeout_seconds"], "shutdown_timeout_seconds", 1, 3600)

    if "takeover_seconds" in data:
        kw["takeover_seconds"] = _number(data["takeover_seconds"], "takeover_seconds", 3, 3600)
    if "heartbeat_seconds" in data:
        kw["heartbeat_seconds"] = _number(data["heartbeat_seconds"], "heartbeat_seconds", 0.1, 600)
    takeover = kw.get("takeover_seconds", DEFAULT_TAKEOVER_SECONDS)
    if kw.get("heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS) > takeover / 3:
        raise ConfigError("heartbeat_seconds", f"must be at most a third of takeover_seconds ({takeover:g} s)")

    wechat = _parse_wechat(data.get("wechat"), base, env)
    if wechat.mode == "sandbox" and not url.startswith("sqlite") and env.get(ENV_ALLOW_SANDBOX) != "1":
        raise ConfigError(
            "wechat.mode",
            f"sandbox never moves money and refuses a non-SQLite database; set {ENV_ALLOW_SANDBOX}=1 if you mean it",
        )
    kw["wechat"] = wechat

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
