"""Job settings by declaration: one pydantic model per kind of stage, owned by the stage.

Every model is frozen, forbids unknown keys, and takes no string for a number or a boolean.
``validate_job`` turns pydantic's complaint into one ``ConfigError`` naming the dotted key
(``jobs.submit_refund.retry_delays_seconds[1]``), so a bad value is still one line and exit 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

MAX_BATCH_SIZE = 10_000
DEFAULT_INTERVAL_SECONDS = 2.0
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_RETRY_DELAYS_SECONDS = (5.0, 15.0, 60.0, 300.0, 900.0)
DEFAULT_GATEWAY_BATCH_SIZE = 200
DEFAULT_GATEWAY_MAX_ATTEMPTS = 20
DEFAULT_CONCURRENCY = 16
DEFAULT_LEASE_SECONDS = 120.0


class ConfigError(Exception):
    """A bad configuration: ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# YAML writes 5 as an int: both are seconds. At most a day: .inf would overflow a timedelta.
Seconds = Annotated[StrictFloat | StrictInt, Field(ge=0, le=86_400)]
Delays = Annotated[tuple[Seconds, ...], Field(min_length=1)]


class JobSettings(BaseModel):
    """What every stage's job takes in jobs.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="", exclude=True)  # set from the key, never written in the file
    enabled: StrictBool = True
    interval_seconds: Annotated[StrictFloat | StrictInt, Field(gt=0, le=86_400)] = DEFAULT_INTERVAL_SECONDS
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH_SIZE)] = DEFAULT_BATCH_SIZE
    max_attempts: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = DEFAULT_MAX_ATTEMPTS
    retry_delays_seconds: Delays = DEFAULT_RETRY_DELAYS_SECONDS


class GatewayJobSettings(JobSettings):
    """A stage that calls WeChat: calls at once, and how long a row is leased for its call."""

    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH_SIZE)] = DEFAULT_GATEWAY_BATCH_SIZE
    max_attempts: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = DEFAULT_GATEWAY_MAX_ATTEMPTS
    concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = DEFAULT_CONCURRENCY
    lease_seconds: Annotated[StrictFloat | StrictInt, Field(ge=1, le=86_400)] = DEFAULT_LEASE_SECONDS


def validate_job(model: type[JobSettings], name: str, raw: Any) -> JobSettings:
    key = f"jobs.{name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(raw).__name__}")
    if "name" in raw:
        raise ConfigError(f"{key}.name", "unknown key (the job's name is its key under jobs)")
    try:
        return model.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise config_error(key, exc) from None


_UNION_TAGS = frozenset({"float", "int", "str", "bool", "constrained-float", "constrained-int", "constrained-str"})


def config_error(prefix: str, exc: ValidationError) -> ConfigError:
    """pydantic's first complaint as one ConfigError naming the dotted key under ``prefix``."""
    error = exc.errors(include_url=False)[0]
    key = prefix
    for part in error["loc"]:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part in _UNION_TAGS or "[" in str(part):
            continue  # which branch of a union (float | int) or validator complained: not a key
        else:
            key += f".{part}" if key else str(part)
    if error["type"] == "extra_forbidden":
        return ConfigError(key, "unknown key")
    if error["type"] == "value_error":  # our own validators: their message says it all
        return ConfigError(key, str(error["ctx"]["error"]))
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list, tuple)) else f", got {given!r}"
    return ConfigError(key, f"{error['msg'][0].lower()}{error['msg'][1:]}{shown}")
