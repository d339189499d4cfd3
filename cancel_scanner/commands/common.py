"""What every command shares: the exit codes, the context holding the configuration, and the
one-line failure messages. Commands import this module; nothing here imports a command.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cancel_scanner.config import Config, load_config, resolve_config_path
from cancel_scanner.engine.config import ConfigError
from cancel_scanner.scanners import REGISTRY

if TYPE_CHECKING:
    from sqlalchemy import Engine

EXIT_OK = 0
EXIT_FAILURE = 1  # anything else: the database down, a call that failed; one line on stderr
EXIT_CONFIG = 2  # bad usage or configuration: one line naming the key
EXIT_BEHIND = 3  # `migrate --check`: the schema is behind this code
EXIT_DIFFERS = 4  # `reconcile`: reconciled, differences found (in reconcile_diff)
EXIT_NOT_READY = 75  # EX_TEMPFAIL, `reconcile`: WeChat's bill is not ready yet; try again later

# A row id: a positive BIGINT. Anything else is bad usage (exit 2), said before any row is touched;
# SQLite cannot even bind a larger int (OverflowError), MariaDB would quietly find nothing.
ROW_ID = click.IntRange(1, 2**63 - 1)


def by_option(kept: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``--by WHO`` (default $USER): who acts, kept where ``kept`` says."""
    return click.option(
        "--by",
        "who",
        default=lambda: os.environ.get("USER", "operator"),
        show_default="$USER",
        help=f"Who acts (kept {kept}).",
    )


EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 failure (one line on stderr); 2 bad usage or configuration (one line"
    " naming the key); 3 migrate --check: schema behind; 4 reconcile: differences found;"
    " 75 reconcile: the bill is not ready yet, try later."
)


def fail_config(err: ConfigError) -> NoReturn:
    click.echo(f"cancel-scanner: configuration error: {err}", err=True)
    sys.exit(EXIT_CONFIG)


def short(exc: BaseException) -> str:
    """The first line of an exception's text, at most 300 characters; a database error's code and
    message only (describe_db_error: never its statement or parameters)."""
    from sqlalchemy.exc import DBAPIError

    from cancel_scanner.engine.errors import describe_db_error

    if isinstance(exc, DBAPIError):
        return describe_db_error(exc)[:300]
    return str(exc).splitlines()[0][:300] if str(exc) else ""


@contextmanager
def database(cfg: Config, failed: Callable[[Exception], str]) -> Iterator[Engine]:
    """The configured database, disposed of at the end. What the body raises (but an exit) is one
    line on stderr, ``cancel-scanner: `` and ``failed``'s text, and exit 1."""
    from cancel_scanner.engine.db import engine_for

    engine = engine_for(cfg)
    try:
        yield engine
    except Exception as exc:  # noqa: BLE001 - the operator needs one readable line, not a traceback
        click.echo(f"cancel-scanner: {failed(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()


class CliContext:
    """The group's options, and the configuration read once, on first use."""

    def __init__(
        self, config_path: str | None, log_json: bool | None, log_level: str | None, operator: str | None = None
    ):
        self.config_path = config_path
        self.log_json = log_json
        self.log_level = log_level
        self.operator = operator  # --operator NAME: kept with every action recorded in operator_action
        self.action: Any = None  # the running command's record (audited), for it to say what it changed
        self._config: Config | None = None

    def changed(self, what: str) -> None:
        """Add a line to what the running command changed (its operator_action row), in English: a record."""
        if self.action is not None:
            self.action.changed = f"{self.action.changed}; {what}" if self.action.changed else what

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(resolve_config_path(self.config_path), REGISTRY)
            except ConfigError as err:
                fail_config(err)
            self.setup_logging()
        return self._config

    def setup_logging(self) -> None:
        from cancel_scanner.engine.logs import setup_logging

        cfg = self._config
        json_lines = self.log_json if self.log_json is not None else (cfg.log_json if cfg else False)
        level = self.log_level or (cfg.log_level if cfg else "INFO")
        setup_logging(json_lines=json_lines, level=level)


def check_schema(cfg: Config, *, tolerate_outage: bool) -> None:
    """Exit 2 with one line when the database's schema is not this code's (behind, ahead, none).

    A database that is down is the daemon's to wait for (``tolerate_outage``); `run --once` and
    `status` say so and exit 1.
    """
    from cancel_scanner.app import schema_problem
    from cancel_scanner.engine.db import engine_for
    from cancel_scanner.engine.errors import is_transient_db_error

    db = engine_for(cfg)
    try:
        problem = schema_problem(db)
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        if tolerate_outage and is_transient_db_error(exc):
            return
        click.echo(f"cancel-scanner: database unavailable: {short(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        db.dispose()
    if problem:
        click.echo(f"cancel-scanner: database_url: {problem}", err=True)
        sys.exit(EXIT_CONFIG)


def audited(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Record the command in ``operator_action`` (cancel_scanner/operations/audit.py): put under
    ``@click.pass_obj``; the command may set ``obj.action.changed``."""

    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def run(obj: CliContext, **params: Any) -> None:
            from cancel_scanner.engine.db import engine_for
            from cancel_scanner.operations.audit import recorded

            cfg = obj.config()
            db = engine_for(cfg)
            try:
                with recorded(db, name, params, obj.operator) as action:
                    obj.action = action
                    command(obj, **params)
            finally:
                db.dispose()

        return run

    return wrap
