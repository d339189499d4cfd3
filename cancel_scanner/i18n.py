"""Human text in the reader's language: gettext catalogs (zh_CN by default, en), the display time zone,
and amounts in yuan.

What changes with ``locale`` is only what people read: the ``result_msg`` a merchant gets, the status
page, `status`, the alerts sent to a group robot. Result codes, column values, metric names, log
event fields and the CLI's options are the same in every language; the logs stay English.

The catalogs are ``cancel_scanner/locale/<locale>/LC_MESSAGES/cancel_scanner.po``, compiled to ``.mo``
when the package is built (setup.py); a checkout without the ``.mo`` compiles the ``.po`` in memory
with Babel. A message is marked in the code with ``N_()`` (kept English until shown) and shown with
``tr(locale)(message)``; its placeholders are ``{name}`` and survive translation
(tests/unit/test_catalogs.py checks every message of the code, in both languages).
"""

from __future__ import annotations

import gettext
import io
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

Locale = Literal["zh_CN", "en"]
LOCALES: tuple[Locale, ...] = ("zh_CN", "en")
DEFAULT_LOCALE: Locale = "zh_CN"
DEFAULT_DISPLAY_TIMEZONE = "Asia/Shanghai"
DOMAIN = "cancel_scanner"
LOCALE_DIR = Path(__file__).parent / "locale"
HTML_LANG = {"zh_CN": "zh-CN", "en": "en"}


def N_(message: str) -> str:  # noqa: N802 - gettext's own name for "mark, translate later"
    """Marks ``message`` for the catalogs; it is translated where it is shown."""
    return message


@cache
def translations(locale: str) -> gettext.NullTranslations:
    """The catalog of ``locale``: the built ``.mo``, else the ``.po`` compiled now; English needs none."""
    if locale not in LOCALES:
        raise ValueError(f"locale must be one of {', '.join(LOCALES)}: {locale!r}")
    folder = LOCALE_DIR / locale / "LC_MESSAGES"
    mo = folder / f"{DOMAIN}.mo"
    if mo.is_file():
        with mo.open("rb") as fp:
            return gettext.GNUTranslations(fp)
    po = folder / f"{DOMAIN}.po"
    if not po.is_file():
        return gettext.NullTranslations()
    return gettext.GNUTranslations(io.BytesIO(compile_po(po)))


def compile_po(po: Path) -> bytes:
    """A ``.po`` file as ``.mo`` bytes (Babel), for the build and for a checkout."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    with po.open("rb") as fp:
        catalog = read_po(fp)
    out = io.BytesIO()
    write_mo(out, catalog)
    return out.getvalue()


def tr(locale: str) -> Callable[[str], str]:
    """The function that shows a marked message in ``locale``."""
    return translations(locale).gettext


def yuan(fen: int) -> str:
    """Fen as yuan with two decimals, by integer arithmetic: 123456 -> '¥1,234.56'."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(int(fen)), 100)
    return f"{sign}¥{whole:,}.{cents:02d}"


def local_time(at: datetime | float | None, zone: str = DEFAULT_DISPLAY_TIMEZONE, *, seconds: bool = True) -> str:
    """A stored UTC time (naive, or epoch seconds) as the reader's wall clock with its offset:
    '2026-12-07 20:15:03 +08:00' ('... UTC' on UTC)."""
    if at is None:
        return ""
    if isinstance(at, int | float):
        moment = datetime.fromtimestamp(at, UTC)
    else:
        moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    local = moment.astimezone(ZoneInfo(zone))
    text = local.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    if zone == "UTC":
        return f"{text} UTC"
    offset = local.strftime("%z")
    return f"{text} {offset[:3]}:{offset[3:]}"


class Phrase(str):
    """A message with its values: reads as the English text, and remembers its template and values so that
    ``render`` can show it in another language (the template is what the catalogs translate)."""

    template: str
    values: dict

    def __new__(cls, template: str, **values: object) -> Phrase:
        made = super().__new__(cls, template.format(**values))
        made.template, made.values = template, dict(values)
        return made


def render(message: str, locale: str) -> str:
    """``message`` (a marked text or a Phrase) in ``locale``."""
    show = tr(locale)
    if isinstance(message, Phrase):
        return show(message.template).format(**message.values)
    return show(message)


def cells(s: str) -> int:
    """Terminal columns ``s`` takes: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in s)


def fit(s: str, width: int) -> str:
    """Cut ``s`` to ``width`` columns, marking the cut."""
    if cells(s) <= width:
        return s
    out, used = [], 0
    for ch in s:
        w = cells(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(s: str, width: int, *, right: bool = False) -> str:
    """``s`` in exactly ``width`` terminal columns (cut if longer), left- or right-aligned."""
    s = fit(s, width)
    space = " " * (width - cells(s))
    return space + s if right else s + space
