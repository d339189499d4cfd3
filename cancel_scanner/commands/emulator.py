"""`cancel-scanner emulator`: WeChat Pay v3's refund API, emulated on a loopback port."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cancel_scanner.commands.common import EXIT_CONFIG, CliContext
from cancel_scanner.gateway.wechat_config import DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS, WECHAT_REFUND_SPACING_SECONDS


def _seconds(name: str, default: float, text: str):
    return click.option(name, default=default, show_default=True, type=click.FloatRange(0), help=text)


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to listen on.")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--key-dir", type=click.Path(file_okay=False, path_type=Path), help="Where to write generated key material."
)
@_seconds("--success-delay", DEFAULT_SANDBOX_SUCCESS_DELAY_SECONDS, "Seconds from PROCESSING to SUCCESS.")
@_seconds(
    "--refund-spacing",
    WECHAT_REFUND_SPACING_SECONDS,
    "Seconds WeChat wants between two new refunds of one payment (a sooner one is answered 429); 0: any.",
)
@click.pass_obj
def command(
    obj: CliContext, host: str, port: int, key_dir: Path | None, success_delay: float, refund_spacing: float
) -> None:
    """Serve the WeChat Pay v3 refund emulator on a loopback port."""
    from cancel_scanner.engine.logs import setup_logging
    from cancel_scanner.engine.net import is_loopback_host

    if not is_loopback_host(host):
        click.echo(f"cancel-scanner: --host: the emulator serves loopback addresses only, got {host!r}", err=True)
        sys.exit(EXIT_CONFIG)
    setup_logging(json_lines=bool(obj.log_json), level=obj.log_level or "INFO")
    from cancel_scanner.gateway.emulator.command import serve

    sys.exit(serve(host, port, key_dir, success_delay=success_delay, min_refund_interval=refund_spacing or None))
