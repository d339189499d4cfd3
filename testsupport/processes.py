"""The product's command line in subprocesses, for the acceptance tests and the benchmarks alike.

``run_cli`` runs one command to completion. ``DaemonProcess`` is ``cancel-scanner --log-json run``
with a generated configuration: started, signalled (SIGTERM, SIGKILL) and restarted by a test, or
run for the length of a ``with`` block by a benchmark; every life has its own log file, read back
as JSON records. ``LogFollower`` reads one life's log as it grows. ``process_cpu_seconds`` and
``process_memory_mb`` read /proc, so a benchmark can tell the daemon's cost from its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testsupport.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "cli.py"
# Environment a developer's shell may carry that would change what the daemon under test does.
SCRUBBED_ENV = ("CANCEL_SCANNER_CONFIG", "CANCEL_SCANNER_DB_URL", "CANCEL_SCANNER_ALLOW_SANDBOX", "WECHATPAY_APIV3_KEY")
START_TIMEOUT_SECONDS = 60  # a `with DaemonProcess(...)` block's wait for the daemon to run
STOP_TIMEOUT_SECONDS = 60  # stop()'s wait for the exit after SIGTERM


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """``config`` as the jobs.yaml at ``path``, keys in the order given."""
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without SCRUBBED_ENV, the repository importable, output unbuffered, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str], *, config: Path | None, env: Mapping[str, str] | None = None, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`cancel-scanner [--config PATH] ARGS...` to completion, stdout and stderr captured apart."""
    cmd = [sys.executable, str(CLI)] + (["--config", str(config)] if config else []) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak resident set since start), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def parse_records(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON log records among ``lines``; anything else (a traceback, a line cut short) is skipped."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


@dataclass
class _Life:
    """One incarnation of a daemon: its process, its log file, and how we expected it to end."""

    proc: subprocess.Popen
    log_path: Path
    started_at: float
    expected: str | None = None  # "sigterm" or "kill9" once we signalled it


class DaemonProcess:
    """`cancel-scanner --config PATH --log-json run` as a subprocess; restartable, every life logged apart.

    Its configuration is written to ``workdir/NAME.yaml``, life N's output to ``workdir/NAME.N.log``.
    As a context manager it runs for the block: started and waited for on entry, stopped with
    SIGTERM on exit.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        env: Mapping[str, str],
        *,
        name: str = "daemon",
        log_level: str | None = None,
        args: Sequence[str] = ("run",),
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = dict(config)
        self.config_path = write_config(self.workdir / f"{name}.yaml", self.config)
        self.env = dict(env)
        self.log_level = log_level
        self.args = list(args)
        self.lives: list[_Life] = []

    # lifecycle

    def start(self) -> DaemonProcess:
        """A new life: the command in a subprocess, its output to this life's log file."""
        assert not self.alive, f"{self.name} is already running"
        log_path = self.workdir / f"{self.name}.{len(self.lives) + 1}.log"
        cmd = [sys.executable, str(CLI), "--config", str(self.config_path), "--log-json"]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        cmd += self.args
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=cli_env(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.lives.append(_Life(proc=proc, log_path=log_path, started_at=time.monotonic()))
        return self

    def wait_started(self, timeout: float = 30) -> None:
        """Until this life logged that it runs (configuration read, scheduler up)."""
        life = self._life
        wait_until(
            lambda: any(r.get("action") == "started" for r in self._records(life)),
            timeout,
            f"{self.name} to start",
            daemons=[self],
        )

    def wait_started_or_exit(self, timeout: float = 30) -> int | None:
        """None once this life logged that it runs; its exit code if it ended first (a refused configuration)."""
        life = self._life
        state = wait_until(
            lambda: (
                ("exited", life.proc.poll())
                if life.proc.poll() is not None
                else ("started", None)
                if any(r.get("action") == "started" for r in self._records(life))
                else None
            ),
            timeout,
            f"{self.name} to start or exit",
        )
        return state[1]

    def sigterm(self) -> None:
        """Ask this life to stop, as an operator does; an exit code other than 0 then is a finding."""
        self._life.expected = "sigterm"
        self._life.proc.send_signal(signal.SIGTERM)

    def kill9(self) -> None:
        """SIGKILL this life and reap it: a crash, as far as the daemon can tell."""
        life = self._life
        life.expected = "kill9"
        life.proc.kill()
        life.proc.wait(10)

    def wait(self, timeout: float) -> int:
        """The exit code of this life; AssertionError (and a kill) if it is still running after ``timeout``."""
        try:
            return self._life.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"{self.name} did not exit within {timeout:.1f}s\n{self.tail()}") from None

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, as an operator stops it, if it still runs; this life's exit code (``wait``'s rules)."""
        if self.alive:
            self.sigterm()
        return self.wait(timeout)

    def close(self) -> None:
        """Teardown: nothing may outlive the test."""
        for life in self.lives:
            if life.proc.poll() is None:
                life.expected = life.expected or "teardown"
                life.proc.kill()
                life.proc.wait(10)

    def __enter__(self) -> DaemonProcess:
        self.start()
        try:
            self.wait_started(START_TIMEOUT_SECONDS)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.close()

    # state

    @property
    def _life(self) -> _Life:
        assert self.lives, f"{self.name} was never started"
        return self.lives[-1]

    @property
    def started(self) -> bool:
        return bool(self.lives)

    @property
    def alive(self) -> bool:
        return bool(self.lives) and self._life.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._life.proc.poll()

    @property
    def exit_expected(self) -> bool:
        return self._life.expected is not None

    @property
    def pid(self) -> int:
        return self._life.proc.pid

    @property
    def log_path(self) -> Path:
        """This life's log file."""
        return self._life.log_path

    def cpu_seconds(self) -> float:
        """CPU time this life has used so far (it must still run)."""
        return process_cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        """This life's resident set now and at its peak (VmRSS, VmHWM; it must still run)."""
        return process_memory_mb(self.pid)

    def check_alive(self) -> None:
        """AssertionError with the log's tail if this life has ended."""
        assert self.alive, f"{self.name} exited with {self.returncode}\n{self.tail()}"

    def unexpected_exits(self) -> list[str]:
        """Lives that ended without us asking, or that a SIGTERM did not end with 0."""
        found = []
        for i, life in enumerate(self.lives, 1):
            code = life.proc.poll()
            if code is None:
                continue
            if life.expected is None:
                found.append(f"{self.name} life {i} exited on its own with {code}")
            elif life.expected == "sigterm" and code != 0:
                found.append(f"{self.name} life {i} exited with {code} after SIGTERM")
        return found

    # logs

    @staticmethod
    def _read(life: _Life) -> list[str]:
        try:
            return life.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def _records(self, life: _Life) -> list[dict[str, Any]]:
        return parse_records(self._read(life))

    def logs(self, life: int | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log records of every life (or of life number ``life``, 1-based)."""
        lives = self.lives if life is None else [self.lives[life - 1]]
        return [r for lf in lives for r in self._records(lf)]

    def log_text(self) -> str:
        """Every life's output, as written."""
        return "\n".join("\n".join(self._read(life)) for life in self.lives)

    def stray_output(self) -> list[str]:
        """Lines that are not JSON log records (a traceback printed past the logger).

        The last line of a life we killed with SIGKILL may be cut short: not a finding.
        """
        found = []
        for life in self.lives:
            lines = self._read(life)
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                if life.expected == "kill9" and i == len(lines) - 1:
                    continue
                try:
                    json.loads(line)
                except ValueError:
                    found.append(line[:300])
        return found

    def tail(self, lines: int = 30) -> str:
        """The last lines of this life's log, headed by its path: what a failure message shows."""
        if not self.lives:
            return ""
        got = self._read(self._life)[-lines:]
        return f"--- {self._life.log_path} (last {len(got)} lines) ---\n" + "\n".join(got)


class LogFollower:
    """Reads a daemon life's log as it grows, for "kill it the moment it logs X"."""

    def __init__(self, daemon: DaemonProcess):
        self.path = daemon.log_path
        self.offset = 0
        self.partial = ""

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.005) -> bool:
        """True as soon as a new record satisfies ``predicate``; False once ``timeout`` passed without one."""
        deadline = time.monotonic() + timeout
        while True:
            if any(predicate(r) for r in self.new_records()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def new_records(self) -> list[dict[str, Any]]:
        """The records logged since the last call (a line still being written waits for the next)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        return parse_records(lines)
