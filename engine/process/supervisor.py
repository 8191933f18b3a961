"""The pre-fork supervisor of `seckill run`, on the model of gunicorn's arbiter.

Signal handlers only queue the signal and wake the loop; one tick of the loop
dispatches queued signals, reaps exited children, kills hung ones and
restores the worker count. Workers prove they are alive by touching a
heartbeat file; the supervisor compares its age with the timeout.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import backoff, exits
from engine.config import Settings
from engine.metrics import daemon as metrics
from engine.process import sdnotify
from engine.process.health import start_health_server
from engine.process.worker import run_worker

log = logging.getLogger("seckill.supervisor")

SIGNALS = ("HUP", "QUIT", "INT", "TERM", "TTIN", "TTOU", "CHLD")
KILL_GRACE = 5.0  # seconds between SIGABRT and SIGKILL for a hung worker
STABLE_AFTER = 60.0  # a worker that lived this long resets its slot's backoff
RESPAWN_BACKOFF_MAX = 30.0  # a crash-looping worker is respawned at most this rarely


@dataclass
class WorkerSlot:
    """One place in the pool; respawns keep the slot and so the consumer name."""

    number: int
    pid: int = 0
    heartbeat: Path | None = None
    spawned_at: float = 0.0
    booted: bool = False
    failures: int = 0  # consecutive crashes or boot failures
    boot_failures: int = 0
    not_before: float = 0.0  # backoff: do not respawn before this monotonic time
    retiring: bool = False
    aborted_at: float = 0.0
    generation: int = 0


@dataclass
class Supervisor:
    load_settings: Callable[[], Settings]
    workers: int | None = None
    settings: Settings = field(init=False)
    slots: dict[int, WorkerSlot] = field(default_factory=dict)
    target: int = 0
    generation: int = 0
    halt_reason: str | None = None
    _signals: list[int] = field(default_factory=list)
    _pipe: tuple[int, int] = (-1, -1)
    _reload_queue: list[int] = field(default_factory=list)
    _stopping: bool = False
    _exit_code: int = 0

    # -- setup --------------------------------------------------------------
    def run(self) -> int:
        self.settings = self.load_settings()
        self.target = self.workers or self.settings.effective_workers()
        self._heartbeat_dir = Path(tempfile.mkdtemp(prefix="seckill-hb-"))
        self._setup_signals()
        self._start_http()
        self._write_pid()
        log.info("supervisor %d starting %d workers", os.getpid(), self.target,
                 extra={"event": "supervisor_started", "workers": self.target})
        self.manage_workers()
        sdnotify.notify("READY=1", f"STATUS=running {self.target} workers",
                        f"MAINPID={os.getpid()}")
        try:
            self._loop()
        finally:
            self._cleanup()
        return self._exit_code

    def _setup_signals(self) -> None:
        self._pipe = os.pipe()
        for fd in self._pipe:
            os.set_blocking(fd, False)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only queue and wake the loop: nothing else is safe in a signal handler.
        if len(self._signals) < 10:
            self._signals.append(signum)
        try:
            os.write(self._pipe[1], b".")
        except OSError:
            pass

    def _start_http(self) -> None:
        if self.settings.metrics_port:
            self._http = start_health_server(self.settings, self.alive_workers)

    def _write_pid(self) -> None:
        if self.settings.pid_file:
            Path(self.settings.pid_file).write_text(f"{os.getpid()}\n")

    # -- the loop -----------------------------------------------------------
    def _loop(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        last_ping = 0.0
        while self.halt_reason is None:
            self._sleep(1.0)
            while self._signals:
                self._dispatch(self._signals.pop(0))
            self.reap_workers()
            if self._stopping or self.halt_reason is not None:
                break
            self.murder_workers()
            self.manage_workers()
            self._advance_reload()
            if watchdog and time.monotonic() - last_ping >= watchdog:
                sdnotify.notify("WATCHDOG=1")
                last_ping = time.monotonic()
        if self.halt_reason is not None:
            log.error("halting: %s", self.halt_reason, extra={"event": "halt"})
            print(f"seckill: error: {self.halt_reason}", file=sys.stderr)
            self.stop(graceful=True)
            self._exit_code = exits.HALTED

    def _sleep(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._pipe[0]], [], [], timeout)
            if ready:
                while os.read(self._pipe[0], 64):
                    pass
        except (OSError, InterruptedError) as exc:
            if getattr(exc, "errno", None) not in (errno.EAGAIN, errno.EINTR, None):
                raise

    def _dispatch(self, signum: int) -> None:
        name = signal.Signals(signum).name
        handler = getattr(self, f"handle_{name[3:].lower()}", None)
        if handler is not None:
            handler()

    # -- signal handlers ------------------------------------------------------
    def handle_chld(self) -> None:
        pass  # reaping happens every tick

    def handle_term(self) -> None:
        self._stopping = True
        self.stop(graceful=True)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self._stopping = True
        self.stop(graceful=False)

    def handle_hup(self) -> None:
        """Re-read the configuration and replace the workers one by one.

        systemd hears RELOADING=1 at once and READY=1 when the reload is over, also
        when it failed: the daemon is ready again, on the old settings.
        """
        sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.settings = self.load_settings()
        except Exception as exc:  # noqa: BLE001 - keep running on the old settings
            log.error("reload failed, keeping the old settings: %s", exc,
                      extra={"event": "reload_failed"})
            sdnotify.notify("READY=1", "STATUS=reload failed; running on the old settings")
            return
        self.generation += 1
        self._reload_queue = sorted(self.slots)
        log.info("reloading: replacing %d workers", len(self._reload_queue),
                 extra={"event": "reload"})

    def handle_ttin(self) -> None:
        self.target += 1
        log.info("workers: %d", self.target, extra={"event": "scale", "workers": self.target})

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
            log.info("workers: %d", self.target, extra={"event": "scale",
                                                        "workers": self.target})

    # -- workers --------------------------------------------------------------
    def spawn(self, slot: WorkerSlot) -> None:
        slot.heartbeat = self._heartbeat_dir / f"worker-{slot.number}"
        slot.heartbeat.touch()
        os.utime(slot.heartbeat, (0, 0))  # a worker's first touch means "booted"
        slot.generation = self.generation
        settings, parent = self.settings, os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            code = exits.FAILED
            try:
                os.close(self._pipe[0])
                os.close(self._pipe[1])
                code = run_worker(settings, slot.number, slot.heartbeat, parent)
            except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
                log.exception("worker %d died", slot.number)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid, slot.spawned_at, slot.booted = pid, time.monotonic(), False
        slot.retiring, slot.aborted_at = False, 0.0
        log.info("spawned worker %d (pid %d)", slot.number, pid,
                 extra={"event": "worker_spawned", "slot": slot.number, "pid": pid})

    def manage_workers(self) -> None:
        now = time.monotonic()
        for number in range(self.target):
            slot = self.slots.setdefault(number, WorkerSlot(number))
            if slot.pid == 0 and now >= slot.not_before:
                self.spawn(slot)
        for number, slot in list(self.slots.items()):
            if number >= self.target:
                if slot.pid and not slot.retiring:
                    self._retire(slot)
                elif not slot.pid:
                    del self.slots[number]

    def _retire(self, slot: WorkerSlot) -> None:
        slot.retiring = True
        self._kill(slot.pid, signal.SIGTERM)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, os.waitstatus_to_exitcode(status))

    def _on_exit(self, pid: int, code: int) -> None:
        metrics.mark_dead(pid)
        slot = next((s for s in self.slots.values() if s.pid == pid), None)
        if slot is None:
            return
        lived = time.monotonic() - slot.spawned_at
        slot.pid = 0
        if slot.retiring or self._stopping:
            log.info("worker %d (pid %d) exited with %d", slot.number, pid, code,
                     extra={"event": "worker_exited", "slot": slot.number, "code": code})
            slot.failures = 0
            return
        self._count_failure(slot, code, lived)

    def _count_failure(self, slot: WorkerSlot, code: int, lived: float) -> None:
        metrics.WORKER_RESTARTS.inc()
        if code == exits.BOOT:
            slot.boot_failures += 1
            if slot.boot_failures >= self.settings.max_boot_failures:
                self.halt_reason = (f"worker {slot.number} failed to boot "
                                    f"{slot.boot_failures} times in a row; see its log above")
                return
        elif slot.booted:
            slot.boot_failures = 0
        slot.failures = 1 if lived > STABLE_AFTER else slot.failures + 1
        delay = backoff.delay(slot.failures, RESPAWN_BACKOFF_MAX)
        slot.not_before = time.monotonic() + delay
        log.warning("worker %d exited with %d after %.1fs; respawning in %.1fs", slot.number,
                    code, lived, delay, extra={"event": "worker_died", "slot": slot.number,
                                               "code": code, "backoff": delay})

    def murder_workers(self) -> None:
        """Kill workers whose heartbeat is older than the timeout: SIGABRT, then SIGKILL."""
        now_wall, now = time.time(), time.monotonic()
        for slot in self.slots.values():
            beat = _last_beat(slot)
            if not slot.pid or beat < 0:
                continue
            if beat > 0:
                slot.booted = True
                silent = now_wall - beat
                limit = self.settings.heartbeat_timeout
            else:
                silent = now - slot.spawned_at
                limit = self.settings.boot_timeout + self.settings.heartbeat_timeout
            if silent <= limit:
                continue
            if not slot.aborted_at:
                log.error("worker %d (pid %d) silent for %.1fs; aborting", slot.number,
                          slot.pid, silent, extra={"event": "worker_hung", "slot": slot.number})
                slot.aborted_at = now
                self._kill(slot.pid, signal.SIGABRT)
            elif now - slot.aborted_at > KILL_GRACE:
                self._kill(slot.pid, signal.SIGKILL)

    def _advance_reload(self) -> None:
        """Replace one worker at a time; the next only once the new one has booted."""
        if not self._reload_queue:
            return
        number = self._reload_queue[0]
        slot = self.slots.get(number)
        if slot is None:
            self._reload_queue.pop(0)
        elif slot.generation == self.generation:
            if slot.booted:
                self._reload_queue.pop(0)
                if not self._reload_queue:
                    sdnotify.notify("READY=1")
                    log.info("reload done", extra={"event": "reload_done"})
        elif slot.pid and not slot.retiring:
            self._retire(slot)

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker; SIGKILL what is left after the graceful timeout."""
        sdnotify.notify("STOPPING=1")
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        for slot in self.slots.values():
            if slot.pid:
                slot.retiring = True
                self._kill(slot.pid, sig)
        deadline = time.monotonic() + (self.settings.graceful_timeout if graceful else 5.0)
        while any(s.pid for s in self.slots.values()) and time.monotonic() < deadline:
            self.reap_workers()
            time.sleep(0.05)
        for slot in self.slots.values():
            if slot.pid:
                log.error("worker %d did not stop in time; killing", slot.number,
                          extra={"event": "worker_killed", "slot": slot.number})
                self._kill(slot.pid, signal.SIGKILL)
        while any(s.pid for s in self.slots.values()):
            self.reap_workers()
            time.sleep(0.02)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _cleanup(self) -> None:
        if self.settings.pid_file:
            Path(self.settings.pid_file).unlink(missing_ok=True)
        for path in self._heartbeat_dir.glob("*"):
            path.unlink(missing_ok=True)
        self._heartbeat_dir.rmdir()
        log.info("supervisor stopped", extra={"event": "supervisor_stopped"})

    def alive_workers(self) -> int:
        """Workers running and booted (called from the HTTP thread too)."""
        return sum(1 for s in list(self.slots.values()) if s.pid and _last_beat(s) > 0)


def _last_beat(slot: WorkerSlot) -> float:
    """mtime of the heartbeat file: 0 until the worker booted, -1 if there is none."""
    if slot.heartbeat is None:
        return -1.0
    try:
        return slot.heartbeat.stat().st_mtime
    except FileNotFoundError:
        return -1.0
