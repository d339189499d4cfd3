"""The `wechat:` section of jobs.yaml, and WeChat Pay's defaults: declared by the channel that reads them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, StrictBool, StrictFloat, StrictInt, field_validator

from cancel_scanner.engine.config import ConfigError, Positive, Section, Text, host_port, readable, text_value
from cancel_scanner.engine.net import is_safe_gateway_url
from cancel_scanner.engine.settings import Seconds

ENV_APIV3_KEY = "WECHATPAY_APIV3_KEY"
APIV3_KEY_BYTES = 32

# WeChat Pay's defaults, each with its unit in the name.
WECHAT_DEFAULT_BASE_URL = "https://api.mch.weixin.qq.com"
DEFAULT_APPLY_QPS = 150.0  # WeChat's per-merchant limits
DEFAULT_QUERY_QPS = 300.0
# Payment query and close: WeChat publishes no figure for these two that we could find; a conservative
# pace of our own (wechat.pay_query_qps / wechat.pay_close_qps).
DEFAULT_PAY_QUERY_QPS = 100.0
DEFAULT_PAY_CLOSE_QPS = 50.0
DEFAULT_TIMEOUT_SECONDS = (5.0, 15.0)  # connect, read; the SDK's own default is to wait forever
DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS = 2.0


WECHAT_REFUND_SPACING_SECONDS = 60  # WeChat Pay: two refunds of one payment at least a minute apart


class SandboxConfig(Section):
    port: Annotated[StrictInt, Field(ge=0, le=65_535)] = 0
    success_delay_seconds: Seconds = DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS
    # The emulator answers 429 to a new refund of a payment sooner than this after the last one, as
    # WeChat does (a minute); keep it at or below jobs.submit_refund.refund_spacing_seconds.
    refund_spacing_seconds: Seconds = WECHAT_REFUND_SPACING_SECONDS


class WeChatConfig(Section):
    """The `wechat:` section. Shapes and types here; the rules of live mode in ``check_live``."""

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
        value = text_value(value)
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
        return host_port(listen)


def check_live(wechat: WeChatConfig, base: Path, env: Mapping[str, str]) -> WeChatConfig:
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
        name: readable(getattr(wechat, name), f"wechat.{name}", base)
        for name in ("merchant_private_key_file", "platform_public_key_file")
    }
    if len(env.get(ENV_APIV3_KEY, "").encode()) != APIV3_KEY_BYTES:
        # Never echo the value: only whether it is there and how long it is.
        raise ConfigError(ENV_APIV3_KEY, "must be set to the 32-byte APIv3 key in live mode")
    return wechat.model_copy(update={"base_url": wechat.base_url.rstrip("/"), **files})
