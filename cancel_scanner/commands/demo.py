"""`cancel-scanner demo`: the embedded default, SQLite and the sandbox gateway, the whole flow."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cancel_scanner.commands.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, CliContext


@click.command("demo")
@click.option(
    "--db",
    "db_path",
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file to create; it must not exist yet. Default: demo.db in a new temporary directory,"
    " kept afterwards (with demo.log) so you can inspect it.",
)
@click.option("--orders", default=40, show_default=True, type=click.IntRange(13, 500), help="Sample orders to seed.")
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the sample data (default: a new one each run; the summary names it).",
)
@click.option(
    "--locale",
    type=click.Choice(["zh_CN", "en"]),
    default="zh_CN",
    show_default=True,
    help="The language of the screen and of the merchants' answers (result_msg).",
)
@click.pass_obj
def command(obj: CliContext, db_path: Path | None, orders: int, seed: int | None, locale: str) -> None:
    """The embedded default: SQLite + sandbox gateway + sample orders, the whole flow.

    Needs no server, no credentials and no jobs.yaml (it does not read one). Logs go
    to a file next to the database; --log-json and --log-level shape that file.
    Exits 0 when everything settled and every check passed.
    """
    from cancel_scanner.demo import DemoError, run_demo

    try:
        ok = run_demo(
            db_path=db_path,
            orders=orders,
            seed=seed,
            log_json=bool(obj.log_json),
            log_level=obj.log_level or "INFO",
            locale=locale,
        )
    except DemoError as err:
        click.echo(f"cancel-scanner: {err}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_OK if ok else EXIT_FAILURE)
