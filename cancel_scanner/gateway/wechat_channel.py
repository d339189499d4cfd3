"""WeChat Pay v3 as a payment channel: its gateway built from the `wechat:` section of jobs.yaml.

Sandbox mode starts the emulator in this process and points the very same WeChat Pay client at it:
there is no separate fake code path.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, ClassVar

from loguru import logger

from cancel_scanner.engine.config import ConfigError
from cancel_scanner.gateway.wechat_config import ENV_APIV3_KEY


def _client_options(wechat: Any) -> dict[str, Any]:
    """What the client takes from `wechat:` the same way in sandbox and live mode: pace, timeouts, notify URL."""
    keys = ("apply_qps", "query_qps", "pay_query_qps", "pay_close_qps", "notify_url", "qps_shared")
    return {"timeout": wechat.timeout_seconds, **{k: getattr(wechat, k) for k in keys}}


def build_gateway(config: Any, stack: ExitStack) -> Any:
    """The live client, or in sandbox mode the Sandbox (its emulator and the client pointed at it)."""
    wechat = config.wechat
    if wechat.mode == "sandbox":
        from cancel_scanner.gateway.sandbox import start_sandbox

        sandbox = start_sandbox(
            success_delay=wechat.sandbox.success_delay_seconds,
            port=wechat.sandbox.port,
            refund_spacing=wechat.sandbox.refund_spacing_seconds or None,
            **_client_options(wechat),
        )
        stack.callback(sandbox.close)
        logger.bind(stage="gateway", action="sandbox").info(
            "sandbox gateway: emulator at {} (no money moves)", sandbox.emulator.base_url
        )
        return sandbox
    from cancel_scanner.gateway.wechat import GatewaySetupError, WeChatPayGateway

    try:
        gateway = WeChatPayGateway(
            mchid=wechat.mchid,
            appid=wechat.appid,
            merchant_serial_no=wechat.merchant_serial_no,
            merchant_private_key_pem=wechat.merchant_private_key_file.read_text(encoding="utf-8"),
            platform_public_key_pem=wechat.platform_public_key_file.read_text(encoding="utf-8"),
            platform_public_key_id=wechat.platform_public_key_id,
            apiv3_key=os.environ.get(ENV_APIV3_KEY, ""),
            base_url=wechat.base_url,
            **_client_options(wechat),
        )
    except GatewaySetupError as exc:
        # The gateway's messages never contain key material.
        raise ConfigError(exc.key, str(exc)) from None
    except ValueError as exc:
        raise ConfigError("wechat", str(exc)) from None
    stack.callback(gateway.close)
    return gateway


class WeChatChannel:
    """Orders and refunds whose ``channel`` is ``wechat`` (every row from before channels existed)."""

    name: ClassVar[str] = "wechat"

    @classmethod
    def build(cls, config: Any, stack: ExitStack) -> Any:
        built = build_gateway(config, stack)
        return getattr(built, "gateway", built)  # a Sandbox carries its client; the client knows its sandbox
