"""`cancel-scanner initdb`: the schema on a new database."""

from __future__ import annotations

import sys

import click

from cancel_scanner.commands.common import EXIT_CONFIG, CliContext, database, short


@click.command("initdb")
@click.pass_obj
def command(obj: CliContext) -> None:
    """Create the schema on a new database (MySQL: sql/schema.sql). Safe to run twice.

    A database that already has tables of its own (a shop's goods_order2, an older
    cancel-scanner) is `cancel-scanner migrate`'s: initdb says so and changes nothing.
    """
    from cancel_scanner.app import schema_problem
    from cancel_scanner.engine.db import init_schema

    cfg = obj.config()
    with database(cfg, lambda exc: f"initdb failed: {type(exc).__name__}: {short(exc)}") as engine:
        problem = schema_problem(engine)
        if problem is not None and problem.kind != "empty":
            click.echo(f"cancel-scanner: initdb: this database has tables already, {problem}", err=True)
            sys.exit(EXIT_CONFIG)
        tables = init_schema(engine)
    click.echo(f"schema ready on {engine.url.render_as_string(hide_password=True)}: {', '.join(tables)}")
