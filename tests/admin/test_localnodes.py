"""Private service instances: they start, answer, restart, stop, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.admin.localnodes import LocalNodeFailed, RedisNode, pid_alive, port_open, reap_orphans

pytestmark = pytest.mark.timeout(120)


def test_redis_starts_answers_restarts_and_stops(tmp_path):
    node = RedisNode(appendonly=True)
    with node:
        assert node.answers() and port_open(node.port)
        assert node.call("SET", "k", "v") == b"+OK"
        first = node.server_pid()
        node.restart()
        assert node.server_pid() != first
        assert node.call("GET", "k") == b"$1"  # the append-only file brought it back
        node.kill()
        assert not node.running() and not port_open(node.port)
        node.start()
        node.freeze()
        assert node.call("PING", timeout=0.3) == b""  # open but silent
        node.thaw()
        assert node.answers()
        pid = node.server_pid()
    assert pid is not None and not pid_alive(pid)
    assert not node.dir.exists() and not port_open(node.port)


def test_redis_without_persistence_forgets_on_restart():
    with RedisNode() as node:
        node.call("SET", "k", "v")
        node.restart()
        assert node.call("GET", "k") == b"$-1"


def test_a_server_that_cannot_start_says_why():
    with RedisNode() as busy:
        clash = RedisNode(port=busy.port)
        with pytest.raises(LocalNodeFailed, match="Address already in use|exit"):
            clash.start()
        clash.destroy()


def test_a_killed_owner_leaves_servers_the_next_session_reaps(tmp_path):
    """A session killed with SIGKILL runs no cleanup: its servers are found and killed."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from engine.admin import localnodes
        localnodes.BASE = Path({str(tmp_path)!r})
        node = localnodes.RedisNode().start()
        print(node.server_pid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    orphan = int(done.stdout.split()[0])
    assert pid_alive(orphan)
    try:
        reaped = reap_orphans(tmp_path)
    finally:
        if pid_alive(orphan):
            os.kill(orphan, 9)
    assert len(reaped) == 1 and not pid_alive(orphan) and list(tmp_path.iterdir()) == []


def test_the_private_redis_fixture(private_redis_settings, private_redis):
    assert private_redis_settings.redis_url == private_redis.url
    assert private_redis.answers()
    private_redis.kill()  # the next test that asks for it gets it back


def test_the_private_redis_comes_back_for_the_next_test(private_redis):
    assert private_redis.answers()
