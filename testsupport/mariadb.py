"""A throwaway MariaDB server for tests and benchmarks.

    from testsupport.mariadb import MariaDBServer

    with MariaDBServer() as db:          # start(); stop() + cleanup() on exit
        engine = sqlalchemy.create_engine(db.url)
        ...

Everything the server writes (data directory, unix socket, pid file, log,
tmpdir) lives in one private temp folder that ``cleanup()`` removes.  The
server listens on 127.0.0.1 on a free port, root has no password.

``stop()``/``start()`` (or ``restart()``) reuse the same data directory and
port, so data survives -- e.g. a database-outage test stops the server for a
while and starts it again.  ``kill()`` SIGKILLs it (crash tests); the next
``start()`` runs InnoDB crash recovery on the same data.

Run ``python -m testsupport.mariadb`` to get a server in the foreground: it prints
its URL on stdout and stops on Ctrl-C / SIGTERM.

The class is not thread-safe: drive one instance from one thread.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pymysql

__all__ = ["MariaDBServer", "MariaDBUnavailable", "find_mariadbd", "find_install_db"]

DEFAULT_DATABASE = "cancel_scanner_test"
START_TIMEOUT = 60.0  # seconds until the server must accept connections
STOP_TIMEOUT = 60.0  # seconds a SIGTERMed server gets before SIGKILL

_SBIN_CANDIDATES = ("/usr/sbin/mariadbd", "/usr/sbin/mysqld")
_DB_NAME = re.compile(r"^[A-Za-z0-9_$]{1,64}$")
_BIND_FAILED = ("Address already in use", "Bind on TCP/IP port", "Do you already have another")


class MariaDBUnavailable(RuntimeError):
    """No MariaDB binary on this machine, or the server failed to start."""


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_mariadbd() -> str | None:
    """Path of the MariaDB server binary (PATH, then /usr/sbin), or None."""
    # /usr/sbin is not on a normal user's PATH, hence the explicit fallbacks.
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name)
        if found:
            return found
    for candidate in _SBIN_CANDIDATES:
        if _is_executable(candidate):
            return candidate
    return None


def find_install_db(mariadbd: str | None = None) -> str | None:
    """Path of mariadb-install-db (next to the server's installation first)."""
    dirs: list[str] = []
    if mariadbd:
        prefix = Path(mariadbd).resolve().parent.parent
        dirs += [str(prefix / "bin"), str(prefix / "scripts")]
    for name in ("mariadb-install-db", "mysql_install_db"):
        for d in dirs:
            if _is_executable(os.path.join(d, name)):
                return os.path.join(d, name)
        found = shutil.which(name) or (f"/usr/bin/{name}" if _is_executable(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# --- never outlive the test process -----------------------------------------
#
# Three layers, because a leaked mariadbd (holding a port, 100+ MB in /tmp and
# 256 MB of buffer pool) is exactly the kind of thing nobody notices until CI
# runs out of memory:
#
# 1. atexit: a normal interpreter exit (tests done, exception, Ctrl-C) stops
#    and removes every server this process started.
# 2. SIGTERM: Python's default SIGTERM action kills the process *without*
#    running atexit, so if nobody else handles SIGTERM we install a handler
#    that stops all servers and then dies of SIGTERM as it would have anyway.
# 3. A watchdog process per server, for the cases no in-process code can
#    handle (SIGKILL, OOM killer, segfault, os._exit).  It is a tiny
#    ``python -c`` loop in its own session (so terminal Ctrl-C / process-group
#    kills aimed at the test run do not take it out first) holding the read
#    end of a pipe from us.  When that pipe hits EOF or its parent pid
#    changes, the test process is gone: it SIGTERMs (then SIGKILLs) every
#    process whose command line carries this server's unique
#    ``--datadir=<temp folder>/data`` -- which also catches a server spawned a
#    microsecond before the crash and mariadb-install-db's bootstrap server --
#    and removes the temp folder.  We chose this over prctl(PR_SET_PDEATHSIG):
#    PDEATHSIG fires when the *thread* that forked exits (a server started
#    from a worker thread would die with that thread), needs a preexec_fn
#    (unsafe with threads) and would not clean the temp folder.  The server
#    itself also runs in its own process group (start_new_session) so that a
#    Ctrl-C in the terminal reaches pytest, which then stops it cleanly,
#    instead of killing it mid-test.

_WATCHDOG_SRC = r"""
import os, select, shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
parent, folder, extra = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
marker = "--datadir=" + os.path.join(folder, "data")
def ours():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if any(a.startswith(marker) for a in args):
            found.append(int(name))
    return found
def kill(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
while True:
    ready, _, _ = select.select([0], [], [], 0.5)
    if ready:
        data = os.read(0, 64)
        if data.startswith(b"disarm"):
            sys.exit(0)
        if not data:
            break
    if os.getppid() != parent:
        break
kill(ours(), signal.SIGTERM)
deadline = time.monotonic() + 30
while ours() and time.monotonic() < deadline:
    time.sleep(0.2)
kill(ours(), signal.SIGKILL)
time.sleep(0.5)
for path in [folder, *extra]:
    shutil.rmtree(path, ignore_errors=True)
"""

_LIVE: set[MariaDBServer] = set()
_SIGTERM_INSTALLED = False


def _shutdown_all() -> None:
    for server in list(_LIVE):
        if server._owner_pid != os.getpid():
            continue  # inherited through fork(): the parent's server, not ours
        try:
            server.stop(timeout=10)
        except Exception:  # noqa: BLE001 - best effort while exiting
            pass
        try:
            server.cleanup()
        except Exception:  # noqa: BLE001
            pass


def _on_sigterm(signum, frame) -> None:
    _shutdown_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_sigterm_handler() -> None:
    global _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    # Only replace the default action: if the application (or a test runner)
    # handles SIGTERM itself, it decides how to exit and atexit + the watchdog
    # cover us.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


atexit.register(_shutdown_all)


class StartedWhileInWith:
    """``with X(...) as x``: ``start()`` on entry; ``release()`` at exit, and when the start fails."""

    def start(self) -> Any:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class MariaDBServer(StartedWhileInWith):
    """A private mariadbd: own temp folder, data directory, socket and port."""

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        database: str = DEFAULT_DATABASE,
        fast: bool = True,
        *,
        mariadbd: str | None = None,
        start_timeout: float = START_TIMEOUT,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if not _DB_NAME.match(database):
            raise ValueError(f"bad database name {database!r}")
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.database = database
        self.fast = fast
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self._mariadbd = mariadbd
        self._requested_port = port
        self._port = port
        self._port_fixed = port is not None
        self._folder: Path | None = None
        self._short_tmp: Path | None = None  # only if the socket path is too long
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()

    # --- properties ----------------------------------------------------------

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the running mariadbd, None when not running."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def folder(self) -> Path | None:
        """The temp folder holding everything (None before start / after cleanup)."""
        return self._folder

    @property
    def datadir(self) -> Path:
        return self._require_folder() / "data"

    @property
    def socket_path(self) -> Path:
        if self._short_tmp is not None:
            return self._short_tmp / "mysqld.sock"
        return self._require_folder() / "mysqld.sock"

    @property
    def pid_file(self) -> Path:
        return self._require_folder() / "mysqld.pid"

    @property
    def log_path(self) -> Path:
        return self._require_folder() / "mariadbd.log"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    @property
    def admin_url(self) -> str:
        """URL without a database (for CREATE/DROP DATABASE and the like)."""
        return f"mysql+pymysql://root@127.0.0.1:{self._require_port()}/?charset=utf8mb4"

    def url_for(self, database: str) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self._require_port()}/{database}?charset=utf8mb4"

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> MariaDBServer:
        """Start the server (initialising the data directory the first time).

        Starting again after stop()/kill() reuses the data directory and port.
        Raises MariaDBUnavailable if there is no MariaDB or it does not come up.
        """
        if self.running:
            return self
        mariadbd = self._mariadbd or find_mariadbd()
        if not mariadbd:
            raise MariaDBUnavailable(
                "mariadbd not found (looked in PATH, /usr/sbin/mariadbd, /usr/sbin/mysqld); "
                "install mariadb-server or set CANCEL_SCANNER_TEST_MYSQL_URL"
            )
        self._mariadbd = mariadbd
        self._owner_pid = os.getpid()
        _LIVE.add(self)
        _install_sigterm_handler()
        if self._folder is None:
            if self.base_dir is not None:
                self.base_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="mariadb-testbed-", dir=self.base_dir))
            # sun_path is 108 bytes; a deep base_dir would make mariadbd fail.
            if len(str(self._folder / "mysqld.sock")) > 100:
                self._short_tmp = Path(tempfile.mkdtemp(prefix="mdb-sock-", dir="/tmp"))
            (self._folder / "tmp").mkdir()
        self._spawn_watchdog()
        if not (self.datadir / "mysql").is_dir():
            self._install_db()
        attempts = 1 if self._port_fixed else 5
        for attempt in range(attempts):
            if self._port is None:
                self._port = _free_port()
            try:
                self._launch()
                break
            except _BindFailed:
                # Somebody grabbed "our" free port between picking and binding.
                if attempt + 1 == attempts:
                    raise MariaDBUnavailable(
                        f"mariadbd could not bind 127.0.0.1:{self._port}\n{_tail(self.log_path)}"
                    ) from None
                self._port = None
        self._port_fixed = True  # from now on restarts keep this port
        self.create_database(self.database)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Clean shutdown: SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc)
                proc.wait(10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (crash tests); data files stay for the next start()."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._killpg(proc)
            proc.wait(10)
        self._proc = None

    def restart(self) -> MariaDBServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server if needed and delete the temp folder and all data."""
        if self.running:
            self.kill()
        self._proc = None
        self._disarm_watchdog()
        for path in (self._folder, self._short_tmp):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self._folder = self._short_tmp = None
        self._port = self._requested_port  # a later start() is a brand-new server
        self._port_fixed = self._requested_port is not None
        _LIVE.discard(self)

    def release(self) -> None:
        """Stop (if running) and remove everything the server left."""
        try:
            self.stop()
        finally:
            self.cleanup()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<MariaDBServer 127.0.0.1:{self._port} {state} folder={self._folder}>"

    # --- SQL helpers ---------------------------------------------------------

    def connect(self, database: str | None = None, **kwargs) -> pymysql.connections.Connection:
        """A pymysql connection as root (no database unless given)."""
        return pymysql.connect(
            host="127.0.0.1",
            port=self._require_port(),
            user="root",
            password="",
            database=database,
            charset="utf8mb4",
            autocommit=True,
            **{"connect_timeout": 5, **kwargs},
        )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE IF NOT EXISTS (utf8mb4); returns its SQLAlchemy URL."""
        self._exec(f"CREATE DATABASE IF NOT EXISTS {_quote(name)} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._exec(f"DROP DATABASE IF EXISTS {_quote(name)}")

    def _exec(self, sql: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    # --- internals -----------------------------------------------------------

    def _require_folder(self) -> Path:
        if self._folder is None:
            raise RuntimeError("server has no folder yet (call start())")
        return self._folder

    def _require_port(self) -> int:
        if self._port is None:
            raise RuntimeError("server has no port yet (call start())")
        return self._port

    def _user_args(self) -> list[str]:
        # mariadbd refuses to run as root unless told to; as anyone else
        # --user would only produce a warning, so leave it out.
        return ["--user=root"] if os.geteuid() == 0 else []

    def _install_db(self) -> None:
        install_db = find_install_db(self._mariadbd)
        if not install_db:
            raise MariaDBUnavailable("mariadb-install-db not found (install mariadb-server)")
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        log = self._require_folder() / "install-db.log"
        cmd = [
            install_db,
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",  # root@127.0.0.1 without password
            "--skip-test-db",
            # no resolveip/DNS lookup of the host name (can hang or fail on CI)
            "--skip-name-resolve",
            f"--user={user}",
            # The bootstrap server's temporary tables in our folder, not the shared /tmp: two
            # bootstraps at once (parallel test workers) failed there with "Unknown table
            # 'mysql.tmp_proxies_priv'".
            f"--tmpdir={self._require_folder() / 'tmp'}",
        ]
        with open(log, "wb") as out:
            try:
                rc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=180
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            raise MariaDBUnavailable(f"mariadb-install-db failed ({rc}):\n{_tail(log)}")

    def _command(self) -> list[str]:
        cmd = [
            self._mariadbd,
            "--no-defaults",  # must come first; ignore /etc/mysql/* and ~/.my.cnf
            *self._user_args(),
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--tmpdir={self._require_folder() / 'tmp'}",
            "--bind-address=127.0.0.1",
            f"--port={self._port}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--default-time-zone=+00:00",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--innodb-buffer-pool-size=256M",
            "--max-connections=500",
        ]
        if self.fast:
            # Speed for tests: write the redo log at commit but fsync it only
            # about once a second, no binlog syncing.  Only an OS crash/power
            # loss could lose the last second of commits -- a SIGKILLed server
            # (kill()) still recovers everything committed.  Never use these
            # settings for real data.
            cmd += ["--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0"]
        return [*cmd, *self.extra_args]

    def _launch(self) -> None:
        log_path = self.log_path
        with open(log_path, "ab") as log:
            log.write(f"\n===== testbed start {time.strftime('%Y-%m-%d %H:%M:%S')} port {self._port} =====\n".encode())
            log.flush()
            offset = log.tell()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # own process group, see module comment
                close_fds=True,
            )
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._proc = None
                text = _tail(log_path, 200, offset)
                if not self._port_fixed and any(m in text for m in _BIND_FAILED):
                    raise _BindFailed()
                raise MariaDBUnavailable(
                    f"mariadbd exited with {rc} during start-up; log {log_path}:\n{_tail(log_path, 40, offset)}"
                )
            try:
                conn = self.connect(connect_timeout=2, read_timeout=2, write_timeout=2)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT @@datadir")
                        (datadir,) = cur.fetchone()
                finally:
                    conn.close()
                if os.path.realpath(datadir) != os.path.realpath(self.datadir):
                    # Another server answers on this port; ours will fail to bind.
                    last_error = RuntimeError(f"port {self._port} is served by {datadir}")
                else:
                    return
            except pymysql.err.MySQLError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                self.kill()
                raise MariaDBUnavailable(
                    f"mariadbd not ready after {self.start_timeout:.0f} s ({last_error}); "
                    f"log {log_path}:\n{_tail(log_path, 40, offset)}"
                )
            time.sleep(0.05)  # poll interval, not a fixed wait

    def _killpg(self, proc: subprocess.Popen[bytes]) -> None:
        # Not reaped yet, so proc.pid (== its process group id) cannot have
        # been reused.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.kill()

    def _spawn_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is None:
            return
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _WATCHDOG_SRC,
                str(os.getpid()),
                str(self._require_folder()),
                *([str(self._short_tmp)] if self._short_tmp else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def _disarm_watchdog(self) -> None:
        wd, self._watchdog = self._watchdog, None
        if wd is None:
            return
        try:
            if wd.poll() is None:
                wd.stdin.write(b"disarm\n")
                wd.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            wd.stdin.close()
        except OSError:
            pass
        try:
            wd.wait(5)
        except subprocess.TimeoutExpired:
            wd.kill()
            wd.wait()


class _BindFailed(Exception):
    pass


def _quote(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(f"bad database name {name!r} (letters, digits, _ and $ only)")
    return f"`{name}`"


# --- python -m testsupport.mariadb ---------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testsupport.mariadb",
        description="Run a throwaway MariaDB in the foreground; prints its URL; Ctrl-C/SIGTERM stops it "
        "and deletes its data.",
    )
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument("--base-dir", type=Path, default=None, help="parent of the temp folder")
    parser.add_argument("--durable", action="store_true", help="fsync at every commit (benchmarks of the real thing)")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server = MariaDBServer(args.base_dir, args.port, args.database, fast=not args.durable)
    try:
        t0 = time.monotonic()
        try:
            server.start()
        except MariaDBUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(server.url, flush=True)
        print(
            f"mariadbd pid {server.pid} ready in {time.monotonic() - t0:.1f} s; log {server.log_path}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.running:
                print(f"error: mariadbd died; log tail:\n{_tail(server.log_path)}", file=sys.stderr)
                return 1
        print("stopping mariadbd", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
