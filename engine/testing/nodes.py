"""Private Redis, RabbitMQ and PostgreSQL instances on ports and directories of their own.

A test that stops, restarts or pauses a service must not do it to the services
everyone shares (a demo, another engineer's run): it asks for an instance of
its own here. `make cluster-up` builds on the same classes for several nodes
(engine.testing.clusters).

Each instance lives in a fresh directory under `BASE` (data, logs, its own
config and, for RabbitMQ, its own HOME and Erlang cookie), listens on
127.0.0.1 at the port it was given (a free one if none), and `start()` returns
only once it answers, or raises `LocalNodeFailed` with the log's last lines.
Every started instance is stopped at interpreter exit; one left behind by a
process that was killed outright is reaped by the next `reap_orphans()`,
which reads the owner PID recorded in each directory. Nothing here addresses
a service by anything but its own port, data directory or node name, so the
shared `rabbit@localhost` node and the Debian PostgreSQL clusters are never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

from engine.errors import ServiceError, WaitTimedOut
from engine.testing.ports import HOST, free_port
from engine.testing.processes import pid_alive
from engine.testing.waits import wait_until

BASE = Path(tempfile.gettempdir()) / "seckill-localnodes"
OWNER_FILE = "owner.pid"
KEPT = "kept"  # in OWNER_FILE: no owner process; reap_orphans leaves it alone
SERVER_PID_FILE = "server.pid"
PG_DATA = "data"
# where each kind's server writes its process ID, relative to its directory, and the
# signal that ends it at once: SIGQUIT is PostgreSQL's immediate shutdown, which (unlike
# SIGKILL) removes its shared memory segment
PID_FILES = {SERVER_PID_FILE: signal.SIGKILL, f"{PG_DATA}/postmaster.pid": signal.SIGQUIT}
RABBIT_BIN_GLOBS = ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin")
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"


class LocalNodeFailed(ServiceError):
    """A private service instance could not be started, stopped or found."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
         what: str) -> subprocess.CompletedProcess[str]:
    """Run a control command; a failure or a hang is a LocalNodeFailed naming `what`."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LocalNodeFailed(f"{what}: no answer in {timeout:g}s ({' '.join(cmd)})") from None
    except OSError as exc:
        raise LocalNodeFailed(f"{what}: cannot run {cmd[0]}: {exc}") from None
    if done.returncode != 0:
        raise LocalNodeFailed(f"{what}: exit {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-800:]}")
    return done


# -- the common shape ----------------------------------------------------------------------
_live: set[LocalNode] = set()


class LocalNode(ABC):
    """One private server: start() waits until it answers; stop() leaves no process."""

    kind = "node"
    start_timeout = 30.0

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = directory is None
        self.dir = directory or _new_dir(self.kind, self.port)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / OWNER_FILE).write_text(f"{os.getpid()}\n")

    @abstractmethod
    def _launch(self) -> None:
        """Start the server process (detached); start() then waits until it answers."""

    @abstractmethod
    def _answers(self) -> bool:
        """Whether the running server serves clients (not just listens)."""

    @abstractmethod
    def _halt(self, timeout: float) -> None:
        """Ask the server to shut down cleanly; stop() waits and kills if it must."""

    def server_pid(self) -> int | None:
        """The server's OS process ID while it runs (from its pid file)."""
        try:
            pid = int((self.dir / SERVER_PID_FILE).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    @property
    @abstractmethod
    def url(self) -> str:
        """Where clients reach it."""

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.kind}.log"

    def running(self) -> bool:
        return self.server_pid() is not None

    def answers(self) -> bool:
        return self.running() and self._answers()

    def start(self) -> Self:
        """Start the server (if it is not running) and wait until it answers."""
        _live.add(self)
        if not self.running():
            self._launch()
        self.wait_answering(self.start_timeout)
        return self

    # how long a launched server may take to write its pid file before it counts as exited
    launch_grace = 3.0

    def wait_answering(self, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        while not self.answers():
            if not self.running() and time.monotonic() > started + self.launch_grace:
                raise LocalNodeFailed(f"{self} exited while starting; its log "
                                      f"({self.log_path}):\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise LocalNodeFailed(f"{self} did not answer in {timeout:g}s; its log "
                                      f"({self.log_path}):\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server cleanly; SIGKILL if it does not go within `timeout`."""
        pid = self.server_pid()
        if pid is not None:
            try:
                self._halt(timeout)
            except LocalNodeFailed:
                pass  # the deadline below decides; a stuck server is killed
            if not _gone(pid, timeout):
                self.kill()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to save or say goodbye (a crash)."""
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _gone(pid, 10):
                raise LocalNodeFailed(f"{self}: pid {pid} survived SIGKILL")

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        pid = self.server_pid()
        if pid is None:
            raise LocalNodeFailed(f"{self} is not running")
        os.kill(pid, sig)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def keep(self) -> Self:
        """Leave the server running after this process exits (e.g. `make cluster-up`):
        neither the exit handler nor `reap_orphans()` stops it; `destroy()` still does."""
        _live.discard(self)
        (self.dir / OWNER_FILE).write_text(f"{KEPT}\n")
        return self

    def destroy(self) -> None:
        """Stop the server, and remove its directory if it made one (kept or not)."""
        with contextlib.suppress(LocalNodeFailed, ProcessLookupError):
            self.thaw()  # a frozen server would sit on a clean shutdown's signal
        if self._own_dir:
            self._discard()  # its data goes with the directory: no need to shut down cleanly
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self.stop()
        _live.discard(self)

    def _discard(self) -> None:
        self.kill()

    def leftovers(self) -> list[int]:
        """PIDs of any process still working in or for this node's directory."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid() \
                    and pid_alive(int(proc.name)) and _started_in(int(proc.name), self.dir):
                found.append(int(proc.name))
        return found

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def __str__(self) -> str:
        return f"private {self.kind} on port {self.port}"


def _new_dir(kind: str, port: int) -> Path:
    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)  # the postgres user must reach its cluster's directory
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{port}-", dir=BASE))


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@atexit.register
def destroy_all() -> None:
    """Every instance this process started, stopped and removed (also run at exit)."""
    for node in list(_live):
        with contextlib.suppress(Exception):
            node.destroy()


def reap_orphans(base: Path | None = None) -> list[Path]:
    """Kill the servers of directories whose owner process is gone; returns those removed.

    A test session killed with SIGKILL runs no atexit handler; its servers (daemons
    by design) would otherwise live on. Only servers recorded in our own
    directories are signalled.
    """
    reaped = []
    for d in sorted((base or BASE).glob("*-*-*")):
        try:
            owner = int((d / OWNER_FILE).read_text())
        except (FileNotFoundError, ValueError):
            continue
        if pid_alive(owner):
            continue
        for pid_file, sig in PID_FILES.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((d / pid_file).read_text().split()[0])
                if pid_alive(pid) and _started_in(pid, d):
                    os.kill(pid, sig)
                    if not _gone(pid, 10):
                        os.kill(pid, signal.SIGKILL)
                        _gone(pid, 10)
        with contextlib.suppress(LocalNodeFailed):
            remove_stale_segment(d / PG_DATA)  # a postmaster that was killed before
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d)
    return reaped


def _started_in(pid: int, directory: Path) -> bool:
    """Whether `pid` is a server of `directory` (a recycled PID is someone else's): its
    working directory (Redis, PostgreSQL) or its environment (RabbitMQ's HOME) is there."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return cwd.startswith(str(directory)) or f"HOME={directory}\0" in environ


# -- Redis ------------------------------------------------------------------------------------
class RedisNode(LocalNode):
    """`redis-server` without snapshots (`--save ''`), optionally with an append-only file."""

    kind = "redis"
    start_timeout = 20.0

    def __init__(self, port: int | None = None, directory: Path | None = None, *,
                 appendonly: bool = False, extra: tuple[str, ...] = ()) -> None:
        super().__init__(port, directory)
        self.appendonly = appendonly
        self.extra = extra

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise LocalNodeFailed("redis-server not found: apt-get install -y redis-server")
        return [exe, "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--daemonize", "yes", "--pidfile", str(self.dir / SERVER_PID_FILE),
                "--logfile", str(self.log_path), *self.extra]

    def _launch(self) -> None:
        (self.dir / SERVER_PID_FILE).unlink(missing_ok=True)
        _run(self.command(), timeout=20, what=str(self))

    def _answers(self) -> bool:
        return self.call("PING") == b"+PONG"

    def call(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command over a raw socket; its first reply line (b"" if there is none)."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout) as s:
                s.sendall(request.encode())
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return b""
        return reply.split(b"\r\n", 1)[0]

    def _halt(self, timeout: float) -> None:
        # SHUTDOWN writes the append-only file out first (no snapshot: --save '')
        self.call("SHUTDOWN", timeout=timeout)


# -- RabbitMQ -------------------------------------------------------------------------------
def rabbit_bin() -> Path:
    """The Debian package's own script directory: its /usr/sbin wrappers would switch to
    the rabbitmq user, whose HOME holds the shared node's cookie."""
    for pattern in RABBIT_BIN_GLOBS:
        for d in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (d / "rabbitmq-server").exists() and (d / "rabbitmqctl").exists():
                return d
    raise LocalNodeFailed("RabbitMQ's scripts not found in /usr/lib/rabbitmq: "
                          "apt-get install -y rabbitmq-server")


AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = 1


class RabbitNode(LocalNode):
    """A RabbitMQ node run as root with its own HOME, cookie, node name, ports and dirs.

    The node name always starts with `seckill-` and every control command names it
    with `-n`, so the shared `rabbit@localhost` is out of reach. Nodes meant to
    form a cluster share a `cookie`.
    """

    kind = "rabbitmq"
    start_timeout = 180.0  # 4-10 s alone; 45 s seen while other runs kept 15 processes busy
    launch_grace = 30.0  # the pid file is written once the VM boots

    def __init__(self, port: int | None = None, directory: Path | None = None, *,
                 name: str | None = None, dist_port: int | None = None,
                 cookie: str | None = None) -> None:
        if name is not None and (not name.startswith("seckill-") or "@" in name):
            raise LocalNodeFailed(f"node name {name!r}: must start with 'seckill-' "
                                  "(no host part); the shared node is never ours")
        super().__init__(port, directory)
        self.dist_port = dist_port or free_port()
        self.nodename = f"{name or f'seckill-{self.port}'}@localhost"
        self.cookie = cookie or secrets.token_hex(16)
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def log_path(self) -> Path:
        return self.dir / "log" / f"{self.nodename}.log"

    def _write_files(self) -> None:
        cookie = self.dir / ".erlang.cookie"
        cookie.unlink(missing_ok=True)
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.port}\n"
            "loopback_users.guest = true\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# not the system's (NODENAME=rabbit)\n")

    def env(self) -> dict[str, str]:
        """Environment of the server and of every control command aimed at it."""
        d = str(self.dir)
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "TMPDIR") and v}
        return {**keep, "HOME": d,
                "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": HOST,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
                "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
                "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
                "RABBITMQ_LOG_BASE": f"{d}/log",
                "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
                "RABBITMQ_PID_FILE": f"{d}/{SERVER_PID_FILE}",
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                    "+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}",
                "ERL_EPMD_ADDRESS": HOST}

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <this node> ...` with this node's HOME and cookie."""
        cmd = [str(rabbit_bin() / "rabbitmqctl"), "-q", "-n", self.nodename, *args]
        return _run(cmd, timeout=timeout, env=self.env(), what=f"{self}: {args[0]}").stdout

    def _launch(self) -> None:
        (self.dir / SERVER_PID_FILE).unlink(missing_ok=True)
        _run([str(rabbit_bin() / "rabbitmq-server"), "-detached"], timeout=60, env=self.env(),
             what=str(self))

    def wait_answering(self, timeout: float) -> None:
        super().wait_answering(timeout)
        # the listener is up; the node's own word that its boot finished
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    def _answers(self) -> bool:
        """An AMQP handshake gets as far as Connection.Start (the app is serving)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as s:
                s.sendall(AMQP_HEADER)
                first = s.recv(8)
        except OSError:
            return False
        return len(first) >= 1 and first[0] == FRAME_METHOD

    def _halt(self, timeout: float) -> None:
        # SIGTERM is RabbitMQ's graceful stop, without a control command's own VM
        self._signal(signal.SIGTERM)

    def stop_app(self) -> None:
        """The broker application stops (every connection drops); the VM stays."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_answering(self.start_timeout)

    def __str__(self) -> str:
        return f"private RabbitMQ node {self.nodename} (AMQP port {self.port})"


# -- PostgreSQL -------------------------------------------------------------------------------
def pg_bin() -> Path:
    """The newest installed server's binaries (initdb, pg_ctl, pg_isready)."""
    found = [d for d in Path("/").glob(PG_BIN_GLOB.lstrip("/")) if (d / "initdb").exists()]
    if not found:
        raise LocalNodeFailed("PostgreSQL's initdb not found in /usr/lib/postgresql: "
                              "apt-get install -y postgresql")
    return max(found, key=lambda d: [int(p) for p in d.parent.name.split(".") if p.isdigit()])


class PostgresNode(LocalNode):
    """A PostgreSQL cluster of its own: `initdb` into its directory, trust authentication.

    initdb and the server refuse to run as root, so as root they run as the
    `postgres` user, which then owns the directory. `fsync=off` because only the
    process, never the machine, is crashed here; commits stay synchronous, so an
    immediate shutdown loses nothing a client was told is committed.
    """

    kind = "postgres"
    start_timeout = 60.0
    user = PG_USER

    def __init__(self, port: int | None = None, directory: Path | None = None, *,
                 database: str = "postgres",
                 settings: tuple[str, ...] = ("fsync=off", "max_connections=200")) -> None:
        super().__init__(port, directory)
        self.database = database
        self.settings = settings
        self.data = self.dir / PG_DATA

    @property
    def url(self) -> str:
        """DSN of `database` (created by whoever migrates it, e.g. dbmate)."""
        return self.dsn(self.database)

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{database}"

    def server_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def _pg_ctl(self, *args: str, timeout: float) -> None:
        _run(self._as_owner(str(pg_bin() / "pg_ctl"), "-D", str(self.data), *args),
             timeout=timeout, what=f"{self}: pg_ctl {args[-1]}")

    def initdb(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, self.user, self.user)
            for path in self.dir.iterdir():
                shutil.chown(path, self.user, self.user)
        _run(self._as_owner(str(pg_bin() / "initdb"), "-D", str(self.data), "-A", "trust",
                            "-U", self.user, "-E", "UTF8", "--locale=C", "--no-sync"),
             timeout=120, what=f"{self}: initdb")

    def _launch(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        options = " ".join([f"-p {self.port}", f"-k {self.dir}",
                            f"-c listen_addresses={HOST}",
                            *(f"-c {s}" for s in self.settings)])
        self._pg_ctl("-l", str(self.log_path), "-o", options, "-w", "-t",
                     str(int(self.start_timeout)), "start", timeout=self.start_timeout + 10)

    def _answers(self) -> bool:
        done = subprocess.run([str(pg_bin() / "pg_isready"), "-q", "-h", HOST, "-p",
                               str(self.port), "-t", "2"], timeout=10,
                              stdin=subprocess.DEVNULL, capture_output=True)
        return done.returncode == 0

    def _halt(self, timeout: float) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", str(int(timeout)), "stop", timeout=timeout + 10)

    def _discard(self) -> None:
        # not SIGKILL: the postmaster would leave its shared memory segment behind
        self.stop_immediately()
        self.remove_stale_segment()

    def remove_stale_segment(self) -> None:
        """After a SIGKILL (kill()) the postmaster's SysV segment stays; the next start
        reuses it, but a cluster that is discarded must not leave it behind."""
        if not self.running():
            remove_stale_segment(self.data)

    def stop_immediately(self) -> None:
        """`pg_ctl stop -m immediate`: no checkpoint, the next start recovers from the WAL."""
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(LocalNodeFailed):  # the deadline below decides
                self._pg_ctl("-m", "immediate", "-w", "-t", "30", "stop", timeout=40)
            if not _gone(pid, 10):
                self.kill()


def remove_stale_segment(data: Path) -> None:
    """Remove the SysV segment a dead postmaster of `data` left, once nobody is attached
    (its ID is on line 7 of postmaster.pid, which a killed postmaster leaves behind)."""
    try:
        shm_id = int((data / "postmaster.pid").read_text().splitlines()[6].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return
    # the backends notice their postmaster's death and detach within moments
    with contextlib.suppress(WaitTimedOut):
        wait_until(lambda: _attached(shm_id) in (0, None), 10, "backends to detach")
    if _attached(shm_id) == 0:
        _run(["ipcrm", "-m", str(shm_id)], timeout=10, what=f"stale segment of {data}")


def _attached(shm_id: int) -> int | None:
    """How many processes are attached to a SysV segment (None: no such segment)."""
    for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        cols = row.split()  # key shmid perms size cpid lpid nattch ...
        if int(cols[1]) == shm_id:
            return int(cols[6])
    return None
