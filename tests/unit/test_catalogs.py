"""The message catalogs (issue 27): every message the code marks has its Chinese and its English, the
translations keep every placeholder, and every result code's message fits result_msg in both languages."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from cancel_scanner.i18n import LOCALE_DIR, LOCALES, Phrase, compile_po, render, yuan
from cancel_scanner.scanners.intake import MESSAGES, UNITS_LEFT, accepted_part, accepted_rest

REPO = Path(__file__).resolve().parents[2]
RESULT_MSG_WIDTH = 255  # req_order_ops.result_msg VARCHAR(255): characters, in utf8mb4


def marked() -> set[str]:
    found = set()
    for root in (REPO / "cancel_scanner", REPO / "scanners", REPO / "models"):
        for _file, _line, message, _c, _ctx in extract_from_dir(
            root, method_map=[("**.py", "python")], keywords={"N_": None}, comment_tags=()
        ):
            found.add(str(message))
    return found


def catalog(locale: str) -> dict[str, str]:
    with (LOCALE_DIR / locale / "LC_MESSAGES" / "cancel_scanner.po").open("rb") as fp:
        return {m.id: m.string for m in read_po(fp) if m.id}


def fields(text: str) -> set[str]:
    return {name for _lit, name, _spec, _conv in string.Formatter().parse(text) if name is not None}


def test_the_code_marks_messages_and_the_catalogs_hold_exactly_them():
    code = marked()
    assert len(code) > 40
    for locale in LOCALES:
        assert set(catalog(locale)) == code, f"{locale}: run scripts/catalogs.py"


@pytest.mark.parametrize("locale", LOCALES)
def test_every_message_has_a_translation_that_keeps_its_placeholders(locale):
    missing, dropped = [], []
    for message, text in catalog(locale).items():
        if not text:
            missing.append(message)
        elif fields(text) != fields(message):
            dropped.append((message, text))
    assert missing == [] and dropped == []


def test_the_chinese_is_chinese():
    for message, text in catalog("zh_CN").items():
        assert re.search(r"[\u4e00-\u9fff]", text), (message, text)


@pytest.mark.parametrize("locale", LOCALES)
def test_the_catalogs_compile(locale):
    assert compile_po(LOCALE_DIR / locale / "LC_MESSAGES" / "cancel_scanner.po").startswith(b"\xde\x12\x04\x95")


@pytest.mark.parametrize("locale", LOCALES)
def test_every_result_codes_message_fits_result_msg_in_both_languages(locale):
    worst = [
        *MESSAGES.values(),
        Phrase(UNITS_LEFT, left=2_147_483_647, quantity=2_147_483_647),
        accepted_part(2_147_483_647, 2_147_483_647, 4_294_967_295, "CSR9223372036854775807-50"),
        accepted_rest(2_147_483_647, 4_294_967_295, "CSR9223372036854775807-50"),
    ]
    for message in worst:
        shown = render(message, locale)
        assert 0 < len(shown) <= RESULT_MSG_WIDTH, (locale, shown)
        if locale == "zh_CN":
            assert shown != str(message)


def test_amounts_are_yuan_with_two_decimals_from_integers():
    assert [yuan(f) for f in (0, 5, 100, 123_456, -250, 4_294_967_295)] == [
        "¥0.00",
        "¥0.05",
        "¥1.00",
        "¥1,234.56",
        "-¥2.50",
        "¥42,949,672.95",
    ]
