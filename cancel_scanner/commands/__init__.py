"""The operator's commands beyond the flow's own (reissue, abnormal-refund, reconcile, prune), one
module each: its click command, parsing and printing only; the work is in cancel_scanner.operations.

Each module exposes ``command`` (a click.Command, or None while it is not built); cli.py adds them
to the ``cancel-scanner`` group. They share cli.py's context, exit codes and messages.
"""

from __future__ import annotations

import importlib

import click

MODULES = ("reissue", "abnormal_refund", "reconcile", "prune")
# A row id: a positive BIGINT. Anything else is bad usage (exit 2), said before any row is touched;
# SQLite cannot even bind a larger int (OverflowError), MariaDB would quietly find nothing.
ROW_ID = click.IntRange(1, 2**63 - 1)


def register(group: click.Group) -> None:
    for name in MODULES:
        command = importlib.import_module(f"{__name__}.{name}").command
        if command is not None:
            group.add_command(command)
