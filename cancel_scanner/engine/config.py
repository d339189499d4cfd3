"""What the engine reads of jobs.yaml, and what every section's model is built from.

Each package declares the section it owns, its defaults beside it: ``gateway.wechat_config``
(``wechat:``), ``monitoring.config``, ``alerts.config``, ``operations.config`` (``reconcile:`` and
``prune:``), and the stages their ``jobs:`` entries (``engine.settings``). ``cancel_scanner.config``
puts them together into the one ``Config``. Every problem is a ``ConfigError`` that names the key
(``jobs.intake.batch_size``) so the CLI can print one line and exit 2. Secrets never live in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from cancel_scanner.engine.settings import ConfigError, JobSettings, config_error

__all__ = ["ConfigError", "config_error"]

ENV_DB_URL = "CANCEL_SCANNER_DB_URL"

# The engine's defaults, each with its unit in the name.
DEFAULT_DATABASE_URL = "sqlite:///cancel-scanner.db"
LEASE_SAFETY_MARGIN_SECONDS = 2.0  # every gateway call is over this long before its lease ends
DEFAULT_TAKEOVER_SECONDS = 10.0  # a process silent this long is dead: survivors release its leases
DEFAULT_HEARTBEAT_SECONDS = 1.0
# On a Galera node, reads (1) and UPDATE/DELETE (2) wait until the node has applied every write the
# cluster committed before them; without, a daemon whose connection moved to another node may act on
# its own earlier writes not yet applied there. See docs/concurrency.md, Galera.
DEFAULT_WSREP_SYNC_WAIT = 3
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0

JobConfig = JobSettings  # what the engine reads of a stage's job; each stage may declare a richer model


class EngineConfig(Protocol):
    """What the engine reads of the configuration (cancel_scanner.config.Config is one)."""

    database_url: str
    takeover_seconds: float
    heartbeat_seconds: float
    wsrep_sync_wait: int
    shutdown_timeout_seconds: float

    def job(self, name: str) -> JobSettings: ...


def _text(value: Any) -> Any:
    # YAML reads an unquoted mchid as a number; it is still the text the merchant wrote.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value.strip() if isinstance(value, str) else value


def text_value(value: Any) -> Any:
    """A value as the text the operator wrote (a number YAML read is its digits), stripped."""
    return _text(value)


Text = Annotated[StrictStr, BeforeValidator(_text), Field(min_length=1)]
Positive = Annotated[StrictFloat | StrictInt, Field(gt=0)]


class Section(BaseModel):
    """A section of jobs.yaml: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def host_port(listen: str | None) -> str | None:
    if listen is not None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
            raise ValueError(f"must be HOST:PORT, got {listen!r}")
    return listen


def clock_time(value: Any) -> Any:
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


ClockTime = Annotated[str, BeforeValidator(clock_time)]


def mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def reject_unknown(data: dict, allowed: set[str], prefix: str) -> None:
    for k in data:
        if k not in allowed:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def readable(path: Path, key: str, base: Path) -> Path:
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"file not readable: {path}")
    return path


def validated(model: type[BaseModel], data: dict, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(prefix, exc) from None
