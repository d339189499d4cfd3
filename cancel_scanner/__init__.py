"""cancel-scanner: one import name for the whole product.

``cancel_scanner.engine`` runs stages (and knows none of them), ``cancel_scanner.scanners`` are the
stages (the repository's ``scanners/``), ``cancel_scanner.models`` the tables (``models/``),
``cancel_scanner.gateway`` talks to WeChat Pay, ``cancel_scanner.app`` wires them together and
``cancel_scanner.cli`` is the command line (the repository's ``cli.py`` runs it).
"""

__version__ = "0.1.0"
