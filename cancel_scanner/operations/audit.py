"""The record of every operator action (issue 28): `requeue`, `reissue`, `abnormal-refund`, `reconcile`,
`prune` and `migrate` each leave a row in ``operator_action``: the command and its arguments (secrets
and bank details never: a value whose name says it could be one is written ``***``), the operating
system user and host, ``--operator NAME``, when it started and ended (the database's clock), how it
ended (ok / refused / failed / interrupted, by its exit code) and a line of what it changed.

The row is written before the command does anything and finished when it ends, each in a short
transaction of its own: a command killed half-way leaves a row without ``ended_at``. A database
where the table cannot be written (a schema older than 9, a `migrate` about to create it) does not
stop the command: it is recorded once the table is there (migrate), or said in one line on stderr.
"""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert, update

from cancel_scanner.models import operator_action

SECRET_NAME = re.compile(r"key|secret|password|passwd|token|account|bank|card|name|details|url", re.IGNORECASE)
OUTCOMES = {0: "ok", 2: "refused"}


def arguments(params: Mapping[str, Any]) -> str:
    """The command's parameters as ``name=value`` pairs, a value that might be a secret written ``***``."""
    shown = []
    for name, value in params.items():
        if value is None or value == () or value is False:
            continue
        if SECRET_NAME.search(name):
            value = "***"
        elif isinstance(value, tuple | list):
            value = ",".join(map(str, value))
        shown.append(f"{name}={value}")
    return " ".join(shown)[:1000]


@dataclass
class Action:
    """The row of one command; what it says it changed (``changed``), set as it goes."""

    command: str
    arguments: str
    operator: str | None
    id: int | None = None
    started: Any = None
    changed: str | None = None


def _now(db: Engine) -> Any:
    from cancel_scanner.engine.clock import DbClock

    return DbClock(db)()


@contextmanager
def recorded(db: Engine, command: str, params: Mapping[str, Any], operator: str | None) -> Iterator[Action]:
    """Record ``command`` around the block; the block's SystemExit code says how it ended."""
    action = Action(command, arguments(params), operator)
    _start(db, action)
    code: int | str | None = 0
    try:
        yield action
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    except KeyboardInterrupt:
        code = "interrupted"
        raise
    except BaseException:
        code = 1
        raise
    finally:
        _finish(db, action, code)


def _start(db: Engine, action: Action) -> None:
    try:
        action.started = _now(db)
        with db.begin() as conn:
            key = conn.execute(
                insert(operator_action).values(_row(action, started_at=action.started))
            ).inserted_primary_key
            action.id = key[0] if key else None
    except Exception:  # noqa: BLE001 - a schema without the table (older than 9, or migrate about to make it)
        action.id = None


def _row(action: Action, **more: Any) -> dict[str, Any]:
    return {
        "command": action.command,
        "arguments": action.arguments,
        "os_user": _os_user()[:64],
        "host": socket.gethostname()[:64],
        "operator": (action.operator or None) and action.operator[:64],
        **more,
    }


def _finish(db: Engine, action: Action, code: int | str | None) -> None:
    outcome = "interrupted" if code == "interrupted" else OUTCOMES.get(code if isinstance(code, int) else 1, "failed")
    ended = {
        "outcome": outcome,
        "exit_code": code if isinstance(code, int) else None,
        "changed": (action.changed or "")[:1000] or None,
    }
    try:
        now = _now(db)
        with db.begin() as conn:
            if action.id is None:  # the table came with this very command (migrate): the whole row now
                conn.execute(
                    insert(operator_action).values(
                        _row(action, started_at=action.started or now, ended_at=now, **ended)
                    )
                )
            else:
                conn.execute(
                    update(operator_action).where(operator_action.c.id == action.id).values(ended_at=now, **ended)
                )
    except Exception:  # noqa: BLE001 - the database went away meanwhile (or has no such table): the row stays open
        return


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a container's bare uid)
        return "?"
