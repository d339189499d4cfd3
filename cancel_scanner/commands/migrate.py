"""`cancel-scanner migrate`: the database brought to this code's schema, never dropping."""

from __future__ import annotations

import sys

import click

from cancel_scanner.commands.common import EXIT_BEHIND, EXIT_CONFIG, EXIT_OK, CliContext, audited, database, short


@click.command("migrate")
@click.option("--sql", "show_sql", is_flag=True, help="Print the statements (with what each locks) and change nothing.")
@click.option("--check", is_flag=True, help="Change nothing; exit 3 when the database is behind, 0 when it is at head.")
@click.pass_obj
@audited("migrate")
def command(obj: CliContext, show_sql: bool, check: bool) -> None:
    """Bring the database to this cancel-scanner's schema: add what is missing, never drop.

    Adopts a shop's existing goods and goods_order2 (adds the scanner's columns with their
    defaults, and its indexes, online), upgrades an older cancel-scanner's, refuses a column
    whose type cannot hold what the scanner writes. Safe to run twice.
    """
    from cancel_scanner.app import migration_plan
    from cancel_scanner.engine import migrate as schema

    cfg = obj.config()
    with database(cfg, lambda exc: f"migrate failed: {type(exc).__name__}: {short(exc)}") as engine:
        try:
            if show_sql or check:
                plan = migration_plan(engine)
                if show_sql:
                    click.echo("\n".join(schema.render(plan)))
                if check:
                    state = "behind" if plan.behind else "at head"
                    click.echo(
                        f"schema version {plan.current if plan.current is not None else 'none'}, head {plan.head}: {state}",
                        err=show_sql,
                    )
                    sys.exit(EXIT_BEHIND if plan.behind else EXIT_OK)
                return
            with schema.exclusive(
                engine, say=click.echo
            ):  # planned under the lock: a second migrate finds nothing to do
                plan = migration_plan(engine)
                if not plan.behind:
                    click.echo(f"schema at version {plan.head}: nothing to do")
                    return
                for note in plan.notes:
                    click.echo(f"note: {note}")
                schema.apply(engine, plan, say=click.echo)
        except schema.SchemaRefused as exc:
            click.echo(f"cancel-scanner: migrate refused: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    click.echo(f"schema at version {plan.head}")
