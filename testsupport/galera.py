"""A throwaway MariaDB Galera cluster on loopback, for the tests and benchmarks that need one.

Each node is a ``MariaDBServer`` (own folder, data directory, socket and port) with the Galera
provider on, its group-communication, IST and SST ports of its own, and its options in a defaults
file instead of ``--no-defaults``: the state-transfer script and mariabackup read the node's
configuration from it (given none, they read the system's /etc/mysql and fail). The first node
bootstraps the cluster; the others join it by a full state transfer with ``mariabackup`` (Debian's
``mariadb-backup``; the ``rsync`` method fails here when run as root). A killed node restarted
with ``restart(i)`` rejoins by an incremental transfer from the others' gcache.

Several seconds a joiner: start one cluster per test module, not per test.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from testsupport.mariadb import MariaDBServer, MariaDBUnavailable, StartedWhileInWith

PROVIDER_PATHS = (
    "/usr/lib/galera/libgalera_smm.so",
    "/usr/lib/galera-4/libgalera_smm.so",
    "/usr/lib64/galera-4/libgalera_smm.so",
)
JOIN_TIMEOUT_SECONDS = 180.0  # a full state transfer on a loaded two-core machine


def find_provider() -> str | None:
    return next((p for p in PROVIDER_PATHS if Path(p).exists()), None)


def missing() -> str | None:
    """What this machine lacks for a cluster (None when it has all of it)."""
    if find_provider() is None:
        return "the Galera provider (Debian's galera-4)"
    if shutil.which("mariabackup") is None and shutil.which("mariadb-backup") is None:
        return "mariabackup (Debian's mariadb-backup)"
    if shutil.which("socat") is None:
        return "socat (the state transfer's streamer)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaleraNode(MariaDBServer):
    """One node: MariaDBServer's options, and the node's, in <folder>/my.cnf."""

    def __init__(self, name: str, galera_args: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.galera_args = galera_args
        self.bootstrap = False

    def _command(self) -> list[str]:
        base = super()._command()  # [mariadbd, --no-defaults, options...]
        options = [arg[2:] for arg in base[2:]] + [arg[2:] for arg in self.galera_args]
        if self.bootstrap:
            options = [o for o in options if not o.startswith("wsrep-cluster-address=")] + [
                "wsrep-cluster-address=gcomm://"
            ]
        cnf = self._require_folder() / "my.cnf"
        cnf.write_text(
            "[mysqld]\n" + "\n".join(options) + "\n"
            "[sst]\nsst-syslog=-1\n"  # the transfer's errors into the node's log, not syslog
            f"[mariabackup]\nsocket={self.socket_path}\n"
        )
        return [base[0], f"--defaults-file={cnf}"]


class GaleraCluster(StartedWhileInWith):
    """``size`` nodes on loopback; ``start()`` bootstraps the first and joins the others."""

    def __init__(
        self, size: int = 3, base_dir: Path | None = None, name: str = "cs-test", log_bin: bool = True
    ) -> None:
        provider = find_provider()
        if provider is None or missing():
            raise MariaDBUnavailable(f"no Galera cluster here: {missing()} not found")
        self.gcomm = [_free_port() for _ in range(size)]
        address = "gcomm://" + ",".join(f"127.0.0.1:{p}" for p in self.gcomm)
        self.nodes = []
        for i, port in enumerate(self.gcomm):
            ist, sst = _free_port(), _free_port()
            args = (
                "--wsrep-on=ON",
                f"--wsrep-provider={provider}",
                f"--wsrep-cluster-name={name}",
                f"--wsrep-cluster-address={address}",
                f"--wsrep-node-name=node{i + 1}",
                f"--wsrep-node-address=127.0.0.1:{port}",
                f"--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{port};ist.recv_addr=127.0.0.1:{ist};"
                "gcache.size=64M;pc.recovery=false",
                f"--wsrep-sst-receive-address=127.0.0.1:{sst}",
                "--wsrep-sst-method=mariabackup",
                "--wsrep-sst-auth=root:",
                "--binlog-format=ROW",
                # A real binary log, as a production node should have: without one (MariaDB's "binlog
                # emulation"), ROLLBACK TO SAVEPOINT after any earlier statement of the transaction
                # still replicates the rolled-back rows (reproduced on 10.11.19: docs/concurrency.md).
                *(("--log-bin=node-bin",) if log_bin else ()),
                "--innodb-autoinc-lock-mode=2",
                "--default-storage-engine=InnoDB",
            )
            self.nodes.append(
                GaleraNode(f"node{i + 1}", args, base_dir=base_dir, fast=True, start_timeout=JOIN_TIMEOUT_SECONDS)
            )

    def start(self) -> GaleraCluster:
        first, *others = self.nodes
        first.bootstrap = True
        first.start()
        first.bootstrap = False  # a restart joins the others like any node
        for node in others:
            node.start()
            self.wait_size(self.size_of_primary(), timeout=JOIN_TIMEOUT_SECONDS)
        self.wait_size(len(self.nodes), timeout=JOIN_TIMEOUT_SECONDS)
        return self

    def status(self, i: int, name: str) -> str | None:
        conn = self.nodes[i].connect(connect_timeout=2, read_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW STATUS LIKE %s", (name,))
                row = cur.fetchone()
            return row[1] if row else None
        finally:
            conn.close()

    def size_of_primary(self) -> int:
        return sum(1 for node in self.nodes if node.running)

    def wait_size(self, size: int, timeout: float = 60.0) -> None:
        """Until every running node is Synced in a primary component of ``size`` nodes."""
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            try:
                seen = [
                    (self.status(i, "wsrep_cluster_size"), self.status(i, "wsrep_local_state_comment"))
                    for i, node in enumerate(self.nodes)
                    if node.running
                ]
                if all(s == (str(size), "Synced") for s in seen):
                    return
            except Exception as exc:  # noqa: BLE001 - a node still starting or just killed: look again
                seen = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise MariaDBUnavailable(f"cluster not {size} nodes Synced after {timeout:.0f} s: {seen}")
            time.sleep(0.2)  # poll interval, not a fixed wait

    def kill(self, i: int) -> None:
        """kill -9 of node ``i`` (the others form a primary component of the rest)."""
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Start a killed or stopped node again: it rejoins (IST from the others' gcache)."""
        self.nodes[i].start()
        self.wait_size(self.size_of_primary(), timeout=JOIN_TIMEOUT_SECONDS)

    def url_for(self, i: int, database: str) -> str:
        return self.nodes[i].url_for(database)

    def create_database(self, name: str) -> None:
        self.nodes[0].create_database(name)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.running:
                node.stop()
        for node in self.nodes:
            node.cleanup()

    @classmethod
    def started(cls, size: int = 3, base_dir: Path | None = None, attempts: int = 2, **kwargs) -> GaleraCluster:
        """A cluster that came up, trying again with fresh ports: the free ports picked when the nodes
        are made are free only then, and another process on the machine may take one meanwhile."""
        for attempt in range(1, attempts + 1):
            folder = base_dir / f"try{attempt}" if base_dir is not None else None
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            cluster = cls(size, base_dir=folder, **kwargs)
            try:
                return cluster.start()
            except MariaDBUnavailable:
                cluster.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def release(self) -> None:
        self.stop()
