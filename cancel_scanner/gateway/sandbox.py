"""Sandbox mode: the emulator plus a real WeChatPayGateway pointed at it.

The gateway is the very class used live, so sandbox runs exercise signing,
verification, pacing, timeouts, deadlines (NotSent), answer caps and
classification exactly as production does; only the far end is ours. Keys
are generated in memory per sandbox and never touch the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cancel_scanner.gateway.emulator import APPLY_QPS, QUERY_QPS, SUCCESS_DELAY_SECONDS, Emulator, FaultHooks
from cancel_scanner.gateway.keys import KeyMaterial, generate_key_material
from cancel_scanner.gateway.wechat import WeChatPayGateway


@dataclass(frozen=True)
class Sandbox:
    gateway: WeChatPayGateway
    emulator: Emulator
    keys: KeyMaterial

    def close(self) -> None:
        self.gateway.close()
        self.emulator.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What the merchant holds of the key material (the platform's private key stays with the emulator).
MERCHANT_KEY_FIELDS = (
    "mchid",
    "appid",
    "merchant_serial_no",
    "merchant_private_key_pem",
    "platform_public_key_pem",
    "platform_public_key_id",
    "apiv3_key",
)


def client_for(keys: KeyMaterial, base_url: str, **options: Any) -> WeChatPayGateway:
    """The live client, holding the merchant side of ``keys``, pointed at ``base_url``.

    ``options`` may also replace any of the keys' fields (a test's wrong merchant key).
    """
    merchant_side = {name: getattr(keys, name) for name in MERCHANT_KEY_FIELDS}
    return WeChatPayGateway(**{**merchant_side, "base_url": base_url, **options})


def start_sandbox(
    success_delay: float = SUCCESS_DELAY_SECONDS,
    faults: FaultHooks | None = None,
    port: int = 0,
    *,
    emulator_apply_qps: int | None = APPLY_QPS,
    emulator_query_qps: int | None = QUERY_QPS,
    keys: KeyMaterial | None = None,
    refund_spacing: float | None = None,
    **client_options: Any,
) -> Sandbox:
    """Start an emulator on 127.0.0.1:port and a gateway that talks to it; close() stops both.

    New keys unless ``keys`` are given (the tests pass one set made per session). ``client_options``
    are WeChatPayGateway's (apply_qps, timeout, notify_url, qps_shared, ...), with its defaults.
    ``faults``: the emulator's fault hooks (gateway.emulator.hooks); the daemon's sandbox mode passes
    none, the tests pass testsupport.emulator_faults.EmulatorFaults. ``refund_spacing``: seconds the
    emulator wants between two new refunds of one payment, as WeChat does (a minute); None: any.
    """
    keys = keys or generate_key_material()
    emulator = Emulator(
        keys,
        port=port,
        success_delay=success_delay,
        faults=faults,
        apply_qps=emulator_apply_qps,
        query_qps=emulator_query_qps,
        min_refund_interval=refund_spacing,
    ).start()
    try:
        gateway = client_for(keys, emulator.base_url, **client_options)
    except BaseException:
        emulator.stop()
        raise
    sandbox = Sandbox(gateway=gateway, emulator=emulator, keys=keys)
    gateway.sandbox = sandbox  # the in-process emulator this client talks to (the demo and tests read it)
    return sandbox
