"""The wheel a user installs: one import name, every package of the tree, the schema, no test code.

Given the repository (scanners/ and models/ at its root, as the layout asks), when a wheel is
built from it, then site-packages gains ``cancel_scanner`` and its dist-info and nothing else,
``cancel_scanner.scanners`` and ``cancel_scanner.models`` are the root's folders, the packaged
schema is byte for byte sql/schema.sql, and the commands run from the unpacked wheel alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def test_the_packaged_schema_is_sql_schema_sql(wheel):
    assert wheel.read("cancel_scanner/engine/data/schema.sql") == (REPO / "sql" / "schema.sql").read_bytes()


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
