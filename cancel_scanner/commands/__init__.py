"""Every operator command, one module each: its click command, parsing and printing only; the work is
in cancel_scanner.engine and cancel_scanner.operations. What they share (exit codes, the context
holding the configuration, one-line failures) is in ``common``; cli.py only builds the group.
"""

from __future__ import annotations

import click

from cancel_scanner.commands import (
    abnormal_refund,
    config,
    demo,
    emulator,
    history,
    initdb,
    migrate,
    prune,
    reconcile,
    reissue,
    requeue,
    run,
    status,
)

COMMANDS: tuple[click.Command, ...] = (
    initdb.command,
    migrate.command,
    run.command,
    status.command,
    history.command,
    requeue.command,
    reissue.command,
    abnormal_refund.command,
    reconcile.command,
    prune.command,
    config.command,
    demo.command,
    emulator.command,
)
