"""SIGHUP re-reads the config file: a changed setting takes effect in the new workers; a
broken file leaves the old settings in force. Either way systemd hears RELOADING=1, then
READY=1 (we play its notify socket)."""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support import add_products, announce, row_count

from engine.keys import GROUP
from engine.testing.processes import SECKILL, engine_env, stop_process
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(180)


class Notifications:
    """The datagrams the supervisor sends to $NOTIFY_SOCKET, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def _drain(self) -> None:
        while True:
            try:
                self.lines.extend(self.sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                return

    async def after(self, start: int, *expected: str, timeout: float = 60) -> int:
        """Wait until `expected` arrived in this order after line `start`; the index past
        the last one."""
        async def arrived() -> bool:
            self._drain()
            return _find(self.lines, start, expected) >= 0
        await wait_for(arrived, timeout, f"{expected} after {self.lines[:start]}",
                       interval=0.05)
        return _find(self.lines, start, expected)

    def close(self) -> None:
        self.sock.close()


def _find(lines: list[str], start: int, expected: tuple[str, ...]) -> int:
    i = start
    for want in expected:
        while i < len(lines) and lines[i] != want:
            i += 1
        if i == len(lines):
            return -1
        i += 1
    return i


class Engine:
    """`seckill run` reading max_entry_bytes from a config file (not the environment)."""

    def __init__(self, settings, config: Path, notify: Path) -> None:
        env = engine_env(settings)
        del env["SECKILL_MAX_ENTRY_BYTES"]  # the file's value, or the environment would win
        env.update(SECKILL_CONFIG=str(config), NOTIFY_SOCKET=str(notify))
        self.log_path = Path(tempfile.mkstemp(prefix="seckill-reload-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([SECKILL, "run", "--workers", "1"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


async def _order(redis, keys, pid: int, uid: int, padding: int) -> str:
    entry_id = await redis.xadd(keys.stream(pid), {"uid": str(uid), "ts": str(int(time.time())),
                                                   "note": "x" * padding})
    return entry_id.decode()


async def _handled(redis, keys, settings, pid: int, logged: int, dead: int) -> bool:
    pending = (await redis.xpending(keys.stream(pid), GROUP))["pending"]
    groups = await redis.xinfo_groups(keys.stream(pid))
    return (await row_count(settings, [pid]) == logged
            and await redis.xlen(keys.dlq(pid)) == dead
            and pending == 0 and groups[0]["lag"] == 0)


async def _dead_reasons(redis, keys, pid: int) -> list[tuple[str, str]]:
    return [(f[b"id"].decode(), f[b"reason"].decode())
            for _, f in await redis.xrange(keys.dlq(pid))]


async def test_sighup_applies_a_changed_file_and_keeps_the_old_settings_on_a_broken_one(
        settings, redis, keys, product_id, tmp_path):
    pid = product_id
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    config = tmp_path / "seckill.toml"
    config.write_text("max_entry_bytes = 4096\n")
    notes = Notifications(tmp_path / "notify.sock")
    engine = Engine(settings, config, notes.path)
    try:
        seen = await notes.after(0, "READY=1")
        big = await _order(redis, keys, pid, 1, 1000)  # ~1 KB: fits 4096
        await wait_for(lambda: _handled(redis, keys, settings, pid, 1, 0), 60,
                       "the 1 KB order logged under the 4096-byte limit")

        # a changed setting: the replaced worker refuses what the old one took
        config.write_text("max_entry_bytes = 512\n")
        before = set(engine.children())
        engine.proc.send_signal(signal.SIGHUP)
        seen = await notes.after(seen, "RELOADING=1", "READY=1")

        async def replaced() -> bool:
            kids = set(engine.children())
            return len(kids) == 1 and not kids & before
        await wait_for(replaced, 30, "the worker replaced")
        big = await _order(redis, keys, pid, 2, 1000)
        await _order(redis, keys, pid, 3, 100)
        await wait_for(lambda: _handled(redis, keys, settings, pid, 2, 1), 60,
                       "the 1 KB order dead-lettered, the small one logged")
        assert await _dead_reasons(redis, keys, pid) == [(big, "oversized")]

        # a broken file: an error logged, systemd told, the old settings kept
        config.write_text("max_entry_bytes = [not toml\n")
        before = set(engine.children())
        engine.proc.send_signal(signal.SIGHUP)
        seen = await notes.after(seen, "RELOADING=1", "READY=1")
        assert "reload failed, keeping the old settings" in engine.output()
        assert "not valid TOML" in engine.output()
        assert set(engine.children()) == before, "a failed reload replaced the workers"
        # a worker respawned now gets the supervisor's settings: still the 512 limit
        for child in before:
            subprocess.run(["kill", "-KILL", str(child)], check=True)

        async def respawned() -> bool:
            kids = set(engine.children())
            return len(kids) == 1 and not kids & before and \
                engine.output().count(" booted as ") >= 3
        await wait_for(respawned, 30, "the killed worker respawned")
        big2 = await _order(redis, keys, pid, 4, 1000)
        await _order(redis, keys, pid, 5, 100)
        await wait_for(lambda: _handled(redis, keys, settings, pid, 3, 2), 60,
                       "the respawned worker on the old (512-byte) limit")
        assert await _dead_reasons(redis, keys, pid) == [(big, "oversized"), (big2, "oversized")]
        assert engine.proc.poll() is None
    finally:
        engine.stop()
        notes.close()
