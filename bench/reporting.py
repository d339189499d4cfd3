"""What a benchmark reports: its result options, tables and targets, the machine it ran on, the
statistics it uses, and the section it appends to RESULTS.md (with the date, command and machine)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import OUT_DIR, REPO
from testsupport.mariadb import MariaDBServer

RESULTS_PATH = REPO / "bench" / "RESULTS.md"
QUICK_RESULTS_PATH = OUT_DIR / "RESULTS-quick.md"


# --- arguments and output ------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """Every script's arguments: --quick, and where (whether) its figures are appended."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="small N: a smoke run (results go to bench/out/RESULTS-quick.md)"
    )
    p.add_argument("--results", type=Path, default=None, help="append the figures here (default: bench/RESULTS.md)")
    p.add_argument("--no-results", action="store_true", help="print only, append nothing")
    return p


def results_path(args: argparse.Namespace) -> Path | None:
    """Where this run appends its section: --results, else RESULTS.md (a --quick run: bench/out/); None with --no-results."""
    if args.no_results:
        return None
    if args.results:
        return args.results
    return QUICK_RESULTS_PATH if args.quick else RESULTS_PATH


def command_line() -> str:
    """This run's command, as RESULTS.md records it."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def size(args: argparse.Namespace, name: str, *, quick: float, full: float) -> Any:
    """``--<name>`` as given, else the script's size for a ``--quick`` or a full run."""
    return getattr(args, name) or (quick if args.quick else full)


def arguments(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The script's arguments, parsed; the product's logging quieted for its run (``quiet_logging``)."""
    args = p.parse_args()
    quiet_logging()
    return args


def quiet_logging() -> None:
    """Warnings and errors only: the product's INFO lines would bury the tables."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@dataclass
class Target:
    name: str
    measured: str
    target: str
    met: bool | None  # None: not applicable in this run (said why in `measured`)


@dataclass
class Report:
    title: str
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine_before: dict = field(default_factory=dict)

    def table(self, caption: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((caption, headers, rows))
        print(f"\n{caption}\n{markdown_table(headers, rows)}", flush=True)

    def target(self, name: str, measured: str, target: str, met: bool | None) -> None:
        self.targets.append(Target(name, measured, target, met))
        mark = {True: "met", False: "NOT MET", None: "n/a"}[met]
        print(f"target {name}: {measured} (target {target}) -> {mark}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def markdown(self, command: str) -> str:
        m = self.machine_before or machine()
        after = machine_load()
        lines = [
            f"## {self.title}",
            "",
            f"- date: {m['date']}",
            f"- command: `{command}`",
            f"- machine: `{m['uname']}`; {m['cpu']}; nproc {m['nproc']}; memory {m['memory']}",
            f"- software: Python {m['python']}, {m['mariadb']}; commit {m['commit']}",
            f"- load: before {m['load']}, after {after['load']}; other test runs (pgrep -f pytest) before: "
            f"{m['pytest'] or 'none'}, after: {after['pytest'] or 'none'}",
            "",
        ]
        for caption, headers, rows in self.tables:
            lines += [f"**{caption}**", "", markdown_table(headers, rows), ""]
        if self.targets:
            rows = [
                [t.name, t.measured, t.target, {True: "met", False: "**NOT MET**", None: "n/a"}[t.met]]
                for t in self.targets
            ]
            lines += ["**Targets**", "", markdown_table(["target", "measured", "wanted", "verdict"], rows), ""]
        for note in self.notes:
            lines.append(f"- {note}")
        if self.notes:
            lines.append("")
        return "\n".join(lines) + "\n"

    def save(self, args: argparse.Namespace) -> int:
        """Appends this report where ``args`` say (nowhere with --no-results). Returns the script's exit
        status, 0: a target not met is a figure to report, not a failure of the run."""
        path = results_path(args)
        if path is None:
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the scripts in bench/ (`bench/run`); newest last.\n\n")
            f.write(self.markdown(command_line()))
        print(f"\nappended to {path}", flush=True)
        return 0


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(out)


def fmt(value: Any) -> str:
    """A cell: thousands separated, about three significant digits, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- the machine -------------------------------------------------------------------------------


def _pytest_runs() -> str:
    """Pids of test runs on this machine besides us ('?' if pgrep fails): they would skew the figures."""
    try:
        out = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "?"
    mine = {str(os.getpid())}
    return ",".join(p for p in out if p not in mine)


def machine_load() -> dict:
    """The load average and other test runs, now."""
    return {"load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "pytest": _pytest_runs()}


def machine(server: MariaDBServer | None = None) -> dict:
    """What a result depends on: date, kernel, CPU, memory, Python, MariaDB, commit and load."""
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uname = " ".join(platform.uname())
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mariadb = "MariaDB ?"
    if server is not None:
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                mariadb = f"MariaDB {cur.fetchone()[0]}"
        finally:
            conn.close()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "uname": uname,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "mariadb": mariadb,
        "commit": commit,
        **machine_load(),
    }


# --- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is 0."""
    return a / b if a is not None and b else None
