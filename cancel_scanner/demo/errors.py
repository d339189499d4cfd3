"""The demo's one error: a bad option."""

from __future__ import annotations


class DemoError(Exception):
    """A bad demo option (the CLI exits 2 with this one line)."""
