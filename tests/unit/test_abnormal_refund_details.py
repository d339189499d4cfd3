"""The bank details file of `abnormal-refund`: two lines, read without ever echoing them."""

from __future__ import annotations

import os

import pytest

from cancel_scanner.commands.abnormal_refund import (
    DETAILS_FILE_MAX_BYTES,
    _BadDetails,
    _read_details_file,
    _split_details,
)
from cancel_scanner.gateway.contract import Secret
from cancel_scanner.operations.abnormal import BankCard

ACCOUNT, HOLDER = "6222020200112233445", "张 三"


def test_two_lines_are_stripped_and_an_editors_final_newlines_forgiven():
    raw = f"\ufeff  {ACCOUNT} \r\n {HOLDER}\t\n\n".encode()
    assert _split_details(raw, "f") == (ACCOUNT, HOLDER)


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"", "is empty"),
        (b"\n \n", "is empty"),
        (f"{ACCOUNT}".encode(), "has 1 line(s)"),
        (f"{ACCOUNT}\n\n{HOLDER}\n".encode(), "has 3 line(s)"),
        (f" \n{HOLDER}".encode(), "line 1 (the account number) is empty"),
        (ACCOUNT.encode() + b"\n\xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_anything_but_two_lines_is_refused_without_the_content(raw, says):
    with pytest.raises(_BadDetails) as bad:
        _split_details(raw, "the file")
    assert says in str(bad.value)
    assert ACCOUNT not in str(bad.value) and HOLDER not in str(bad.value)


def test_a_file_others_may_read_is_used_with_a_warning(tmp_path):
    path = tmp_path / "card.txt"
    path.write_text(f"{ACCOUNT}\n{HOLDER}\n", encoding="utf-8")
    warnings: list[str] = []

    os.chmod(path, 0o600)
    assert _read_details_file(str(path), warnings.append) == (ACCOUNT, HOLDER) and warnings == []
    os.chmod(path, 0o644)
    assert _read_details_file(str(path), warnings.append) == (ACCOUNT, HOLDER)
    assert len(warnings) == 1 and "readable by other users" in warnings[0] and ACCOUNT not in warnings[0]


def test_a_pipe_is_read_like_a_file():
    read, write = os.pipe()
    os.write(write, f"{ACCOUNT}\n{HOLDER}\n".encode())
    os.close(write)
    try:
        assert _read_details_file(f"/dev/fd/{read}", lambda line: None) == (
            ACCOUNT,
            HOLDER,
        )  # as `<(pass show card)` gives it
    finally:
        os.close(read)


def test_a_missing_a_huge_or_a_special_file_is_refused(tmp_path):
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"1" * (DETAILS_FILE_MAX_BYTES + 1))
    os.chmod(huge, 0o600)
    for path, says in (
        (tmp_path / "absent", "cannot be read"),
        (huge, "over"),
        (tmp_path, "cannot be read"),
        ("/dev/null", "not a regular file or a pipe"),
    ):
        with pytest.raises(_BadDetails) as bad:
            _read_details_file(str(path), lambda line: None)
        assert says in str(bad.value)


def test_a_bank_card_shows_its_bank_and_nothing_else():
    card = BankCard("ICBC_DEBIT", Secret(ACCOUNT), Secret(HOLDER))
    shown = f"{card!r} {card} {card.account} {card.name:>30} %s" % card.account
    assert "ICBC_DEBIT" in shown and ACCOUNT not in shown and HOLDER not in shown
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(card)


def test_on_a_terminal_the_details_are_asked_for_without_echo_and_the_account_twice():
    from click.testing import CliRunner

    from cancel_scanner.commands.abnormal_refund import _prompt_details

    with CliRunner().isolation(input=f"{ACCOUNT}\n{ACCOUNT}\n{HOLDER}\n") as streams:
        assert _prompt_details() == (ACCOUNT, HOLDER)
    shown = b"".join(s.getvalue() for s in streams).decode()
    assert "Account number again" in shown and ACCOUNT not in shown and HOLDER not in shown
