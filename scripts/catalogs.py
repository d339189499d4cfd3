"""Extract every marked message (N_("...")) of the package and write the catalogs' .po files.

    .venv/bin/python scripts/catalogs.py          # rewrite cancel_scanner/locale/*/LC_MESSAGES/cancel_scanner.po

The Chinese texts live in cancel_scanner/locale/zh_CN/LC_MESSAGES/cancel_scanner.po itself: this script
keeps every translation already there, adds the new messages untranslated (a test then fails until
someone writes them), and drops the ones the code no longer has. English is the messages themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po, write_po

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cancel_scanner"
SOURCES = (PACKAGE, REPO / "scanners", REPO / "models")


def messages() -> dict[str, list[str]]:
    """msgid -> where it is marked (file:line)."""
    found: dict[str, list[str]] = {}
    for root in SOURCES:
        for filename, lineno, message, _comments, _context in extract_from_dir(
            root, method_map=[("**.py", "python")], keywords={"N_": None}, comment_tags=()
        ):
            found.setdefault(str(message), []).append(f"{root.name}/{filename}:{lineno}")
    return found


def write(locale: str, found: dict[str, list[str]]) -> Path:
    path = PACKAGE / "locale" / locale / "LC_MESSAGES" / "cancel_scanner.po"
    old = {}
    if path.is_file():
        with path.open("rb") as fp:
            old = {m.id: m.string for m in read_po(fp) if m.id}
    catalog = Catalog(locale=locale, project="cancel-scanner", charset="utf-8", fuzzy=False)
    for message, places in sorted(found.items()):
        string = message if locale == "en" else old.get(message, "")
        catalog.add(message, string, locations=[(p.rsplit(":", 1)[0], int(p.rsplit(":", 1)[1])) for p in places])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fp:
        write_po(fp, catalog, width=120, omit_header=False, sort_output=True)
    return path


def main() -> int:
    found = messages()
    for locale in ("zh_CN", "en"):
        print(write(locale, found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
