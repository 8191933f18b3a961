"""Private Redis, RabbitMQ and PostgreSQL instances on ports and directories of their own.

A test that stops, restarts or pauses a service must not do it to the services
everyone shares (a demo, another engineer's run): it asks for an instance of
its own here. `make cluster-up` builds on the same classes for several nodes.

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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from engine.errors import ServiceError

BASE = Path(tempfile.gettempdir()) / "seckill-localnodes"
OWNER_FILE = "owner.pid"
SERVER_PID_FILE = "server.pid"
HOST = "127.0.0.1"
RABBIT_BIN_GLOBS = ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin")
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"


class LocalNodeFailed(ServiceError):
    """A private service instance could not be started, stopped or found."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LocalNodeFailed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


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


class LocalNode:
    """One private server: start() waits until it answers; stop() leaves no process."""

    kind = "node"
    start_timeout = 30.0

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = directory is None
        self.dir = directory or _new_dir(self.kind, self.port)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / OWNER_FILE).write_text(f"{os.getpid()}\n")

    # subclasses: _launch() starts the server, _answers() says it serves, _halt() stops it
    def _launch(self) -> None:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def _halt(self, timeout: float) -> None:
        raise NotImplementedError

    def server_pid(self) -> int | None:
        """The server's OS process ID while it runs (from its pid file)."""
        try:
            pid = int((self.dir / SERVER_PID_FILE).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def url(self) -> str:
        raise NotImplementedError

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

    def destroy(self) -> None:
        """Stop the server and remove its directory (when it made it)."""
        try:
            self.thaw()
        except (LocalNodeFailed, ProcessLookupError):
            pass
        self.stop()
        _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

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
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            pid = int((d / SERVER_PID_FILE).read_text().split()[0])
            if pid_alive(pid) and _started_in(pid, d):
                os.kill(pid, signal.SIGKILL)
                _gone(pid, 10)
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d)
    return reaped


def _started_in(pid: int, directory: Path) -> bool:
    """Whether `pid` is a server of `directory` (a recycled PID is someone else's)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(directory) in args or str(directory) in environ


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
