"""The ``cancel-scanner`` command group: its options and its commands, each in cancel_scanner.commands."""

from __future__ import annotations

import click

from cancel_scanner import __version__
from cancel_scanner.commands import COMMANDS
from cancel_scanner.commands.common import EXIT_CODES_HELP, CliContext


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="cancel-scanner")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="jobs.yaml to use (default: $CANCEL_SCANNER_CONFIG, then ./jobs.yaml).",
)
@click.option("--log-json/--no-log-json", default=None, help="One JSON object per log line.")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default=None
)
@click.option(
    "--operator",
    metavar="NAME",
    default=None,
    help="Who is acting: kept with each action recorded in operator_action (requeue, reissue, abnormal-refund, ...).",
)
@click.pass_context
def main(
    ctx: click.Context, config_path: str | None, log_json: bool | None, log_level: str | None, operator: str | None
) -> None:
    """cancel-scanner: merchants' cancel requests to WeChat Pay refunds, stock and sales, exactly once."""
    ctx.obj = CliContext(config_path, log_json, log_level.upper() if log_level else None, operator)


for _command in COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main()
