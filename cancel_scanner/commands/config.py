"""`cancel-scanner config`: the configuration the daemon would run with, every key and its value."""

from __future__ import annotations

import click
import yaml

from cancel_scanner.commands.common import CliContext


@click.command("config")
@click.option("--defaults", is_flag=True, help="The built-in defaults: no jobs.yaml, no environment.")
@click.pass_obj
def command(obj: CliContext, defaults: bool) -> None:
    """Print the effective configuration as YAML: every key, defaults included, as jobs.yaml spells it.

    Secrets are never printed: the database password is masked, the alert webhook URL (it holds the
    robot's key) is only said to be set, and the monitoring token and alert secret are left out.
    """
    from cancel_scanner.config import parse_config
    from cancel_scanner.scanners import REGISTRY

    config = parse_config({}, REGISTRY, source="<defaults>", env={}) if defaults else obj.config()
    click.echo(f"# {config.source}")
    click.echo(
        yaml.safe_dump(config.effective(), sort_keys=False, allow_unicode=True, default_flow_style=None), nl=False
    )
