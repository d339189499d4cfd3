"""The wheel a user installs: one import name, every package of the tree, the schema, no test code.

Given the repository (scanners/ and models/ at its root, as the layout asks), when a wheel is
built from it, then site-packages gains ``cancel_scanner`` and its dist-info and nothing else,
``cancel_scanner.scanners`` and ``cancel_scanner.models`` are the root's folders, the packaged
schema is byte for byte sql/schema.sql, and the commands run from the unpacked wheel alone.
No fault injection ships (issue 25, item 6: it is testsupport's, emulator_faults and bill_faults),
while the emulator, the sandbox and ``cancel-scanner demo`` still run from the wheel alone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED_TREES = {
    "cancel_scanner": "cancel_scanner",
    "scanners": "cancel_scanner/scanners",
    "models": "cancel_scanner/models",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    # A copy, so the build leaves nothing in the checkout; links kept (engine/data/schema.sql is one).
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(work),
            str(source),
        ],
        check=True,
        timeout=120,
    )
    (built,) = work.glob("cancel_scanner-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_claims_one_top_level_name(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"cancel_scanner"}
    assert wheel.read(f"{dist_info.pop()}/top_level.txt").decode().split() == ["cancel_scanner"]


def test_every_package_of_the_tree_ships_and_no_test_code_does(wheel):
    names = set(wheel.namelist())
    expected = {
        f"{installed}/{init.parent.relative_to(REPO / folder).as_posix()}/__init__.py".replace("/./", "/")
        for folder, installed in SHIPPED_TREES.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert expected - names == set(), "a package missing from setup.cfg's packages list"
    assert not [n for n in names if n.split("/")[1:2] in (["testsupport"], ["tests"], ["bench"])]


def test_no_fault_injection_ships(wheel):
    names = set(wheel.namelist())
    assert [n for n in names if re.search(r"(?<!de)fault", n.rsplit("/", 1)[-1])] == []  # "default" is no fault
    assert "cancel_scanner/gateway/emulator/hooks.py" in names  # the emulator's hook points (a protocol) do ship
    sources = {n: wheel.read(n).decode("utf-8") for n in names if n.endswith(".py")}
    imports_test_code = re.compile(r"^\s*(from|import)\s+(testsupport|tests|bench)\b", re.MULTILINE)
    assert [n for n, text in sources.items() if imports_test_code.search(text)] == []
    # What the fault modules define (kinds, plan, bookkeeping, strikes) is defined nowhere in the wheel.
    fault_code = re.compile(
        r"^(class|def) (FaultPlan|Fault|FaultBook|EmulatorFaults|DownloadFault|strike_before|strike_after|padded"
        r"|forged_refund)\b|^(FAULT_KINDS|DOWNLOAD_FAULTS) =",
        re.MULTILINE,
    )
    assert {n: fault_code.findall(text) for n, text in sources.items() if fault_code.search(text)} == {}


def test_the_packaged_schema_is_sql_schema_sql(wheel):
    assert wheel.read("cancel_scanner/engine/data/schema.sql") == (REPO / "sql" / "schema.sql").read_bytes()


def test_the_wheel_carries_the_compiled_catalogs_and_speaks_chinese_from_them_without_babel(wheel, tmp_path):
    names = set(wheel.namelist())
    for locale in ("zh_CN", "en"):
        assert f"cancel_scanner/locale/{locale}/LC_MESSAGES/cancel_scanner.mo" in names
    site = tmp_path / "site"
    wheel.extractall(site)
    probe = (
        "import sys; sys.modules['babel'] = None;"  # the .mo is read by the standard library's gettext alone
        "from cancel_scanner.i18n import render; from cancel_scanner.scanners.intake import MESSAGES;"
        "print(render(MESSAGES['ORDER_SHIPPED'], 'zh_CN'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "订单已发货或已完成：请走售后流程，不能取消"


def test_the_commands_run_from_the_unpacked_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    wheel.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = (
        "import cancel_scanner, cancel_scanner.scanners as s, cancel_scanner.engine.db as db, importlib.util as u;"
        f"assert cancel_scanner.__file__.startswith({str(site)!r}), cancel_scanner.__file__;"
        "assert u.find_spec('testsupport') is None;"
        "print(len(s.REGISTRY.names), len(db.schema_sql()))"
    )
    # cwd outside the checkout: nothing of the repository is on the path.
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    stages, schema_chars = map(int, out.stdout.split())
    assert stages >= 6 and schema_chars == len((REPO / "sql" / "schema.sql").read_text(encoding="utf-8"))
    version = subprocess.run(
        [sys.executable, "-m", "cancel_scanner.cli", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and "cancel-scanner, version" in version.stdout, version.stderr


def test_the_emulator_the_sandbox_and_the_demo_run_from_the_unpacked_wheel_without_test_code(wheel, tmp_path):
    site = tmp_path / "site"
    wheel.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONIOENCODING": "utf-8", "TMPDIR": str(tmp_path)}
    probe = textwrap.dedent(
        f"""
        import importlib.util, re, sys
        import cancel_scanner.commands.emulator, cancel_scanner.demo, cancel_scanner.gateway.emulator.command
        from cancel_scanner.gateway.emulator.hooks import NoFaults
        from cancel_scanner.gateway.sandbox import start_sandbox

        sandbox = start_sandbox()
        try:
            assert isinstance(sandbox.emulator.faults, NoFaults), sandbox.emulator.faults
            try:
                sandbox.emulator.fail_next("R1", "500")
            except RuntimeError:
                pass
            else:
                raise AssertionError("a fault was aimed at an emulator without fault hooks")
        finally:
            sandbox.close()
        assert importlib.util.find_spec("testsupport") is None
        loaded = [m for m in sys.modules if m.startswith(("testsupport", "tests")) or re.search(r"(?<!de)fault", m)]
        assert not loaded, loaded
        outside = [
            name for name, module in list(sys.modules.items())
            if name.startswith("cancel_scanner") and getattr(module, "__file__", None)
            and not module.__file__.startswith({str(site)!r})
        ]
        assert not outside, outside
        print("ok")
        """
    )
    # cwd outside the checkout: nothing of the repository is on the path.
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr

    # `cancel-scanner demo`: the sandbox gateway and the emulator, the whole flow, exits 0 when all checks pass.
    demo = subprocess.run(
        [sys.executable, "-m", "cancel_scanner.cli", "demo", "--orders", "13", "--seed", "7", "--db", "demo.db"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr

    # `cancel-scanner emulator`: serves, prints where it listens, stops cleanly on SIGTERM.
    emulator = subprocess.Popen(
        [sys.executable, "-m", "cancel_scanner.cli", "emulator", "--key-dir", str(tmp_path / "keys")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        first = emulator.stdout.readline() if emulator.stdout else ""
    finally:
        emulator.send_signal(signal.SIGTERM)
        returncode = emulator.wait(timeout=10)
    assert first.startswith("listening on http://127.0.0.1:") and returncode == 0, first
