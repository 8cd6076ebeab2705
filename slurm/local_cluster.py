"""A real single-node SLURM cluster on this machine, for tests and for trying the suite.

Everything the cluster writes (configuration, munge key and socket, state, spool, logs,
pid files, the accounting database) lives under one folder given by the caller. Ports are
picked free at start, and the daemons share nothing with a system-wide munge or SLURM, so
several clusters (one per folder) can run side by side.

Accounting (MariaDB + slurmdbd) is on by default: without it ``sacct`` is disabled, submitit
reports every job as UNKNOWN, and ``job.result()`` of a job that was killed (scancel, time
limit, out of memory) waits forever. With it, submitit sees COMPLETED / FAILED / CANCELLED.

Command line::

    python -m slurm.local_cluster start  --dir /tmp/slurm   # prints: export SLURM_CONF=...
    python -m slurm.local_cluster status --dir /tmp/slurm
    python -m slurm.local_cluster stop   --dir /tmp/slurm

Needs root (slurmd launches jobs, ``SlurmUser=root``) and the Debian packages
``slurm-wlm slurmdbd mariadb-server munge``. No cgroups are used (proctrack/linuxproc,
task/none), so jobs are not confined to their allocation.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from dcbench.core import UserError

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install -y slurm-wlm slurmdbd mariadb-server munge"
CORE_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel")
ACCOUNTING_BINARIES = ("slurmdbd", "sacct", "mariadbd", "mariadb-install-db", "mariadb")
NODE_TOPOLOGY_KEYS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
MARKER_VAR = "LOCAL_SLURM_DIR"  # set in each daemon's environment: proves a pid is ours
MAX_SOCKET_PATH = 107  # AF_UNIX paths: 108 bytes with the final NUL


class LocalSlurmError(UserError):
    """The local cluster could not be started or stopped (the message says why and what to do)."""


@dataclass(frozen=True)
class _Layout:
    """Where the cluster keeps its files, all under ``root``."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def db(self) -> Path:
        return self.root / "mariadb"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def munge_key(self) -> Path:
        return self.etc / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.run / "munge.socket"

    @property
    def db_socket(self) -> Path:
        return self.run / "mariadb.socket"

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.logs / f"{daemon}.log"

    def console_file(self, daemon: str) -> Path:
        """Where a daemon's stdout and stderr go (munged logs only there in the foreground)."""
        return self.logs / f"{daemon}.out"

    def make_dirs(self) -> None:
        for path in (self.etc, self.run, self.logs, self.state, self.spool):
            path.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class _Ports:
    """TCP ports on 127.0.0.1, picked free at each start."""

    slurmctld: int
    slurmd: int
    slurmdbd: int
    mariadb: int


def available(accounting: bool = True) -> bool:
    """True if the SLURM, munge (and, with ``accounting``, MariaDB/slurmdbd) binaries are installed."""
    return not _missing_binaries(accounting)


def _missing_binaries(accounting: bool) -> list[str]:
    names = CORE_BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    return [name for name in names if _which(name) is None]


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders (daemons live there)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def _binary(name: str) -> str:
    found = _which(name)
    if found is None:
        raise LocalSlurmError(f"'{name}' is not installed; install it with: {INSTALL_HINT}")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_hardware() -> dict[str, str]:
    """CPU topology and memory as ``slurmd -C`` reports them (the node must not claim more)."""
    result = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise LocalSlurmError(f"'slurmd -C' could not read this machine's hardware: {result.stderr.strip()}")
    first_line = result.stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in first_line.split() if "=" in item)
    return {key: fields[key] for key in NODE_TOPOLOGY_KEYS if key in fields}


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"  ({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"  {line}" for line in text) or f"  ({path} is empty)"


def _process_is_ours(pid: int, marker: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and carries our marker in its environment."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and marker.encode() in environ.split(b"\0")


class LocalSlurm:
    """A single-node SLURM (munge, [mariadb, slurmdbd,] slurmctld, slurmd) under ``folder``.

    Use as a context manager (``with LocalSlurm(dir) as cluster: ...``) or call
    :meth:`start` / :meth:`stop`. Clients need :attr:`env` in their environment.

    Args:
        folder: holds every file of the cluster (created if missing; keep it short).
        accounting: run MariaDB + slurmdbd so that ``sacct`` (and submitit) see job states.
        start_timeout_s: how long :meth:`start` waits for each daemon and for the idle node.
        node_name: the node's name in SLURM (its address is always 127.0.0.1).
        partition: the name of the one (default) partition.
        first_job_id: the first job id (distinct ranges keep clusters' jobs apart).
    """

    DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

    def __init__(
        self,
        folder: Path | str,
        accounting: bool = True,
        start_timeout_s: float = 60.0,
        node_name: str = "localnode",
        partition: str = "local",
        first_job_id: int = 1,
    ) -> None:
        self.layout = _Layout(Path(folder).expanduser().resolve())
        self.accounting = accounting
        self.start_timeout_s = start_timeout_s
        self.node_name = node_name
        self.partition = partition
        self.first_job_id = first_job_id
        self._marker = f"{MARKER_VAR}={self.layout.root}"
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # ----------------------------------------------------------------- public API
    @staticmethod
    def available(accounting: bool = True) -> bool:
        """True if every binary this cluster needs is installed."""
        return available(accounting)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables SLURM clients (sbatch, squeue, sacct, submitit) need."""
        return {"SLURM_CONF": str(self.layout.slurm_conf)}

    @property
    def daemons(self) -> tuple[str, ...]:
        """The daemons of this cluster, in start order."""
        if self.accounting:
            return self.DAEMONS
        return tuple(d for d in self.DAEMONS if d not in ("mariadbd", "slurmdbd"))

    def running(self) -> dict[str, bool]:
        """Which of this cluster's daemons are running now (checked by pid file)."""
        return {name: self._pid(name) is not None for name in self.daemons}

    def start(self) -> LocalSlurm:
        """Start the daemons (idempotent) and wait until the node is idle."""
        self._check_prerequisites()
        state = self.running()
        try:
            if not all(state.values()):
                if any(state.values()):
                    log.info("Restarting a partially running cluster in %s", self.layout.root)
                    self.stop()
                self._start_daemons()
            self._wait_until_idle()
        except BaseException:
            self.stop()  # leave nothing half-started behind; the logs stay in the folder
            raise
        log.info("Local SLURM is up in %s (%s)", self.layout.root, self.export_line())
        return self

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons this cluster started (found by pid file)."""
        if self._pid("slurmctld") is not None:
            self._cancel_all_jobs()
        for name in reversed(self.DAEMONS):
            self._stop_daemon(name)

    def export_line(self) -> str:
        """The shell line that points SLURM clients at this cluster."""
        return f"export SLURM_CONF={self.layout.slurm_conf}"

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- start-up
    def _check_prerequisites(self) -> None:
        missing = _missing_binaries(self.accounting)
        if missing:
            raise LocalSlurmError(
                f"A local SLURM cluster needs {', '.join(missing)}, which are not installed. "
                f"Install them with: {INSTALL_HINT}"
            )
        if any(char.isspace() for char in str(self.layout.root)):
            raise LocalSlurmError(
                f"The cluster folder '{self.layout.root}' contains whitespace, which slurm.conf "
                "cannot hold. Use a folder without spaces, e.g. /tmp/slurm."
            )
        longest = max(self._socket_paths(), key=len)
        if len(longest) > MAX_SOCKET_PATH:
            raise LocalSlurmError(
                f"The cluster folder {self.layout.root} is too deep: a socket path under it "
                f"({longest}) would exceed {MAX_SOCKET_PATH} characters, the limit of unix "
                "sockets. Use a shorter folder, e.g. /tmp/slurm."
            )
        if os.geteuid() != 0:
            raise LocalSlurmError(
                "A local SLURM cluster must be started as root (slurmd launches jobs as their "
                "users); run the command with sudo, or use --executor local instead."
            )

    def _socket_paths(self) -> list[str]:
        """The longest unix socket paths the daemons create under the folder."""
        layout = self.layout
        step_socket = layout.spool / f"{self.node_name}_{'9' * 8}.4294967291"  # slurmstepd's
        paths = [layout.munge_socket, step_socket] + ([layout.db_socket] if self.accounting else [])
        return [str(path) for path in paths]

    def _start_daemons(self) -> None:
        layout = self.layout
        layout.make_dirs()
        self._write_munge_key()
        ports = _Ports(*_free_ports(4))
        self._write_slurm_conf(ports)
        self._spawn("munged", self._munged_argv())
        self._wait_for(lambda: layout.munge_socket.exists(), "munged", "its socket to appear")
        if self.accounting:
            self._start_accounting(ports)
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(layout.slurm_conf)])
        self._wait_for(self._controller_answers, "slurmctld", "'scontrol ping' to answer")
        self._spawn(
            "slurmd", [_binary("slurmd"), "-D", "-f", str(layout.slurm_conf), "-N", self.node_name]
        )

    def _start_accounting(self, ports: _Ports) -> None:
        layout = self.layout
        password = secrets.token_hex(16)
        self._write_slurmdbd_conf(ports, password)
        if not (layout.db / "mysql").is_dir():
            self._init_database()
        self._spawn("mariadbd", self._mariadbd_argv(ports.mariadb))
        self._wait_for(self._database_answers, "mariadbd", "the database to accept connections")
        self._grant_database_user(password)
        self._spawn("slurmdbd", [_binary("slurmdbd"), "-D"])
        self._wait_for(lambda: _port_open(ports.slurmdbd), "slurmdbd", f"port {ports.slurmdbd}")

    def _write_munge_key(self) -> None:
        key = self.layout.munge_key
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)

    def _write_slurm_conf(self, ports: _Ports) -> None:
        layout = self.layout
        hardware = " ".join(f"{k}={v}" for k, v in _node_hardware().items())
        short_host = socket.gethostname().split(".")[0]
        if self.accounting:
            accounting = [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={ports.slurmdbd}",
                # with slurmdbd, this names the munge socket used to talk to it
                f"AccountingStoragePass={layout.munge_socket}",
            ]
        else:
            accounting = ["AccountingStorageType=accounting_storage/none"]
        lines = [
            "# Written by slurm/local_cluster.py; regenerated at each start.",
            "ClusterName=local",
            f"FirstJobId={self.first_job_id}",
            f"SlurmctldHost={short_host}(127.0.0.1)",
            f"SlurmctldPort={ports.slurmctld}",
            f"SlurmdPort={ports.slurmd}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays the restart of a requeued job (default 120 s)
            f"AuthInfo=socket={layout.munge_socket},cred_expire=5",
            f"StateSaveLocation={layout.state}",
            f"SlurmdSpoolDir={layout.spool}",  # one node per folder; short socket paths
            f"SlurmctldPidFile={layout.run}/slurmctld.slurm.pid",
            f"SlurmdPidFile={layout.run}/slurmd.slurm.pid",
            f"SlurmctldLogFile={layout.log_file('slurmctld')}",
            f"SlurmdLogFile={layout.log_file('slurmd')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=1",  # start requeued jobs promptly
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            *accounting,
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node_name} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        layout.slurm_conf.write_text("\n".join(lines) + "\n")

    def _write_slurmdbd_conf(self, ports: _Ports, password: str) -> None:
        layout = self.layout
        lines = [
            "# Written by slurm/local_cluster.py; regenerated at each start.",
            "AuthType=auth/munge",
            f"AuthInfo=socket={layout.munge_socket}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={ports.slurmdbd}",
            "SlurmUser=root",
            f"PidFile={layout.run}/slurmdbd.slurm.pid",
            f"LogFile={layout.log_file('slurmdbd')}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={ports.mariadb}",
            "StorageUser=slurm",
            f"StoragePass={password}",
            "StorageLoc=slurm_acct_db",
        ]
        path = layout.etc / "slurmdbd.conf"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text("\n".join(lines) + "\n")

    def _munged_argv(self) -> list[str]:
        layout = self.layout
        return [
            _binary("munged"),
            "--foreground",
            "--force",  # the folder may sit under a 0700 temp dir; only root uses this cluster
            f"--key-file={layout.munge_key}",
            f"--socket={layout.munge_socket}",
            f"--pid-file={layout.run}/munged.munge.pid",
            f"--log-file={layout.log_file('munged')}",
            f"--seed-file={layout.run}/munged.seed",
        ]

    def _mariadbd_argv(self, port: int) -> list[str]:
        layout = self.layout
        return [
            _binary("mariadbd"),
            "--no-defaults",
            f"--datadir={layout.db}",
            f"--socket={layout.db_socket}",
            "--bind-address=127.0.0.1",
            f"--port={port}",
            "--user=root",
            f"--pid-file={layout.run}/mariadbd.mariadb.pid",
            f"--log-error={layout.log_file('mariadbd')}",
            "--innodb-lock-wait-timeout=900",
        ]

    def _init_database(self) -> None:
        log.info("Creating the accounting database in %s", self.layout.db)
        result = subprocess.run(
            [
                _binary("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={self.layout.db}",
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise LocalSlurmError(
                f"mariadb-install-db failed in {self.layout.db}:\n{result.stdout}\n{result.stderr}"
            )

    def _sql(self, statement: str) -> subprocess.CompletedProcess[str]:
        """Run one SQL statement as MariaDB's root over the folder's unix socket."""
        argv = [_binary("mariadb"), "--no-defaults", f"--socket={self.layout.db_socket}", "-u", "root"]
        return subprocess.run([*argv, "-e", statement], capture_output=True, text=True)

    def _database_answers(self) -> bool:
        return self._sql("SELECT 1").returncode == 0

    def _grant_database_user(self, password: str) -> None:
        """(Re)create the 'slurm' database user slurmdbd logs in with over TCP."""
        result = self._sql(
            "CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '" + password + "'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        if result.returncode != 0:
            raise LocalSlurmError(f"Could not create the accounting database user: {result.stderr}")

    def _controller_answers(self) -> bool:
        result = self._client(["scontrol", "ping"])
        return result.returncode == 0 and "UP" in result.stdout

    # ----------------------------------------------------------------- processes
    def _daemon_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env[MARKER_VAR] = str(self.layout.root)
        return env

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start one daemon in the foreground of its own session; record its pid."""
        out = self.layout.console_file(name)
        with out.open("ab") as stream:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                cwd=self.layout.root,
                start_new_session=True,
            )
        self._children[name] = proc
        self.layout.pid_file(name).write_text(f"{proc.pid}\n")
        log.debug("Started %s (pid %d): %s", name, proc.pid, " ".join(argv))

    def _pid(self, name: str) -> int | None:
        """The pid of our running daemon ``name``, or None."""
        try:
            pid = int(self.layout.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _process_is_ours(pid, self._marker) else None

    def _alive(self, name: str) -> bool:
        """Is daemon ``name`` running? (Our own children are asked directly: right after
        the fork their environment does not carry the marker yet.)"""
        proc = self._children.get(name)
        if proc is not None:
            return proc.poll() is None
        return self._pid(name) is not None

    def _stop_daemon(self, name: str, grace_s: float = 10.0) -> None:
        pid = self._pid(name)
        pid_file = self.layout.pid_file(name)
        if pid is not None:
            log.debug("Stopping %s (pid %d)", name, pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._pid(name) is not None and time.monotonic() < deadline:
                self._reap(name)
                time.sleep(0.05)
            if self._pid(name) is not None:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, grace_s)
                os.kill(pid, signal.SIGKILL)
        self._reap(name, block=True)
        pid_file.unlink(missing_ok=True)

    def _reap(self, name: str, block: bool = False) -> None:
        """Collect the exit status of a daemon we spawned in this process (no zombies)."""
        proc = self._children.get(name)
        if proc is None:
            return
        try:
            proc.wait(timeout=5 if block else 0)
        except subprocess.TimeoutExpired:
            return
        del self._children[name]

    def _client(self, argv: list[str], timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.update(self.env)
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} timed out")

    def _cancel_all_jobs(self, wait_s: float = 15.0) -> None:
        ids = self._client(["squeue", "-h", "-o", "%A"]).stdout.split()
        if not ids:
            return
        log.info("Cancelling %d job(s) before stopping the cluster", len(ids))
        self._client(["scancel", *ids])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not self._client(["squeue", "-h", "-o", "%A"]).stdout.split():
                return
            time.sleep(0.2)
        log.warning("Jobs still listed %.0f s after scancel; stopping the daemons anyway", wait_s)

    # ----------------------------------------------------------------- waiting
    def _wait_for(self, ready: Callable[[], bool], daemon: str, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if not self._alive(daemon):
                raise self._failure(f"{daemon} exited while waiting for {what}")
            time.sleep(0.1)
        raise self._failure(f"timed out after {self.start_timeout_s:.0f} s waiting for {daemon}: {what}")

    def _node_state(self) -> str:
        result = self._client(["sinfo", "-h", "-N", "-n", self.node_name, "-o", "%T"])
        return result.stdout.strip().lower() if result.returncode == 0 else ""

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        state = ""
        while time.monotonic() < deadline:
            dead = [name for name in self.daemons if not self._alive(name)]
            if dead:
                raise self._failure(f"{', '.join(dead)} exited during start-up")
            state = self._node_state()
            if state.startswith(("idle", "mixed", "allocated")):
                return
            if state.startswith(("drain", "down", "fail")):
                log.info("Node %s is %s; resuming it", self.node_name, state)
                self._client(
                    ["scontrol", "update", f"NodeName={self.node_name}", "State=RESUME"]
                )
            time.sleep(0.2)
        raise self._failure(
            f"timed out after {self.start_timeout_s:.0f} s: node {self.node_name} is "
            f"'{state or 'unknown'}', not idle"
        )

    def _log_of(self, name: str) -> Path:
        log_file = self.layout.log_file(name)
        return log_file if log_file.exists() else self.layout.console_file(name)

    def _failure(self, reason: str) -> LocalSlurmError:
        """An error naming the reason, with the tail of each daemon's log."""
        paths = [self._log_of(name) for name in self.daemons]
        logs = "\n".join(f"--- {path}\n{_tail(path)}" for path in paths if path.exists())
        return LocalSlurmError(
            f"The local SLURM cluster in {self.layout.root} did not start: {reason}.\n{logs}\n"
            f"(All its logs are in {self.layout.logs}; the daemons it started were stopped.)"
        )


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------- command line
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.local_cluster",
        description="Start, stop or inspect a real single-node SLURM cluster on this machine.",
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", required=True, type=Path, help="folder holding all cluster files")
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="skip MariaDB + slurmdbd (faster, but submitit cannot see job states)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="start-up timeout in seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m slurm.local_cluster``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cluster = LocalSlurm(args.dir, accounting=not args.no_accounting, start_timeout_s=args.timeout)
    try:
        if args.action == "start":
            cluster.start()
            print(cluster.export_line())
        elif args.action == "stop":
            cluster.stop()
            print(f"stopped the local SLURM cluster in {cluster.layout.root}")
        else:
            for name, up in cluster.running().items():
                print(f"{name:10s} {'running' if up else 'stopped'}")
            print(cluster.export_line())
            return 0 if all(cluster.running().values()) else 1
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
