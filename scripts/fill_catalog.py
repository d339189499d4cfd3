"""Write translations into a catalog: ``fill_catalog.py LOCALE FILE.py`` where FILE.py defines ZH = {msgid: text}."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from babel.messages.pofile import read_po, write_po

REPO = Path(__file__).resolve().parent.parent


def main(locale: str, source: str) -> int:
    texts = runpy.run_path(source)["ZH"]
    path = REPO / "cancel_scanner" / "locale" / locale / "LC_MESSAGES" / "cancel_scanner.po"
    with path.open("rb") as fp:
        catalog = read_po(fp)
    unknown = [m for m in texts if m not in catalog]
    for message in catalog:
        if message.id and message.id in texts:
            message.string = texts[message.id]
    with path.open("wb") as fp:
        write_po(fp, catalog, width=120, sort_output=True)
    for m in unknown:
        print(f"not in the catalog: {m!r}", file=sys.stderr)
    return 1 if unknown else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
