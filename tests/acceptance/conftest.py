"""Fixtures of the acceptance scenarios; the helpers they use are in tests/acceptance/harness.py and testsupport/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.acceptance import harness
from testsupport.processes import DaemonProcess


@pytest.fixture
def external_emulators():
    """Factory: ExternalEmulator.start(...) on tmp key dirs; every one stopped at teardown."""
    started: list[harness.ExternalEmulator] = []
    harness.quiet_emulator_logs()

    def start(key_dir: Path, **kwargs: Any) -> harness.ExternalEmulator:
        emu = harness.ExternalEmulator.start(key_dir, **kwargs)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()
    harness.loud_emulator_logs()


@pytest.fixture
def daemons():
    """Factory: DaemonProcess(...); every life still running at teardown is killed."""
    made: list[DaemonProcess] = []

    def make(*args: Any, **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(*args, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
