"""Private service instances: they start, answer, restart, stop, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import aiormq
import asyncpg
import pytest

from engine.testing.nodes import (
    LocalNodeFailed,
    PostgresNode,
    RabbitNode,
    RedisNode,
    reap_orphans,
)
from engine.testing.ports import port_open
from engine.testing.processes import pid_alive

SHARED_RABBIT_PID = Path("/var/lib/rabbitmq/mnesia/rabbit@localhost.pid")
SHARED_PG_PIDS = "/var/lib/postgresql/*/main/postmaster.pid"

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
    assert not node.dir.exists() and not port_open(node.port) and node.leftovers() == []


def test_redis_without_persistence_forgets_on_restart():
    with RedisNode() as node:
        node.call("SET", "k", "v")
        node.restart()
        assert node.call("GET", "k") == b"$-1"


def shared_server_pids() -> list[str]:
    """The shared RabbitMQ node's and PostgreSQL clusters' PIDs: ours must not change them."""
    files = [SHARED_RABBIT_PID, *sorted(Path("/").glob(SHARED_PG_PIDS.lstrip("/")))]
    return [f.read_text().split()[0] if f.exists() else "" for f in files]


async def queue_count(url: str, queue: str) -> int:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        declared = await channel.queue_declare(queue, durable=True)
        return declared.message_count
    finally:
        await conn.close()


async def publish(url: str, queue: str) -> None:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        await channel.basic_publish(b"x", routing_key=queue,
                                    properties=aiormq.spec.Basic.Properties(delivery_mode=2))
    finally:
        await conn.close()


async def test_rabbitmq_node_starts_answers_stops_its_app_and_stops():
    shared = shared_server_pids()
    node = RabbitNode()
    assert node.nodename.startswith("seckill-") and node.port != 5672
    with node:
        assert node.answers() and "seckill-" in node.ctl("eval", "node().")
        await queue_count(node.url, "q")
        await publish(node.url, "q")
        node.stop_app()
        assert node.running() and not node.answers()
        node.start_app()
        assert await queue_count(node.url, "q") == 1
        pid = node.server_pid()
        node.stop()  # SIGTERM, RabbitMQ's clean shutdown (restart = stop + start: one boot here)
        assert not node.running() and not port_open(node.port) and node.leftovers() == []
    assert pid is not None and not pid_alive(pid)
    assert not node.dir.exists() and not port_open(node.port) and node.leftovers() == []
    assert shared_server_pids() == shared, "the shared broker or database was touched"


def test_a_node_name_that_could_be_the_shared_one_is_refused():
    with pytest.raises(LocalNodeFailed, match="seckill-"):
        RabbitNode(name="rabbit")


async def test_postgres_cluster_starts_answers_restarts_and_stops():
    shared = shared_server_pids()
    node = PostgresNode()
    with node:
        assert node.answers() and (node.data / "PG_VERSION").exists()
        conn = await asyncpg.connect(node.url, timeout=10)
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        await conn.close()
        node.restart()
        node.stop_immediately()  # no checkpoint: the row comes back from the WAL
        assert not node.running() and not port_open(node.port)
        node.start()
        conn = await asyncpg.connect(node.url, timeout=10)
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
        await conn.close()
        pid = node.server_pid()
    assert pid is not None and not pid_alive(pid)
    assert not node.dir.exists() and not port_open(node.port) and node.leftovers() == []
    assert shared_server_pids() == shared, "the shared broker or database was touched"


def shm_segments() -> set[str]:
    return {row.split()[1] for row in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}


def test_a_killed_postgres_leaves_no_shared_memory_once_destroyed():
    before = shm_segments()
    node = PostgresNode().start()
    node.kill()  # a crash: the postmaster cannot remove its segment
    node.destroy()
    assert node.leftovers() == [] and shm_segments() <= before


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
        from engine.testing import nodes
        nodes.BASE = Path({str(tmp_path)!r})
        node = nodes.RedisNode().start()
        print(node.server_pid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    orphan = int(done.stdout.split()[0])
    assert pid_alive(orphan)
    try:
        reaped = reap_orphans(tmp_path)
        assert len(reaped) == 1 and not pid_alive(orphan) and list(tmp_path.iterdir()) == []
    finally:
        if pid_alive(orphan):
            os.kill(orphan, 9)


def test_a_kept_server_outlives_its_starter_and_is_not_reaped(tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from engine.testing import nodes
        nodes.BASE = Path({str(tmp_path)!r})
        node = nodes.RedisNode().start().keep()
        print(node.server_pid(), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    kept = int(done.stdout.split()[0])
    try:
        assert pid_alive(kept)  # the exit handler left it running
        assert reap_orphans(tmp_path) == [] and pid_alive(kept)
    finally:
        os.kill(kept, 9)


def test_the_private_redis_fixture(private_redis_settings, private_redis):
    assert private_redis_settings.redis_url == private_redis.url
    assert private_redis.answers()
    private_redis.kill()  # the next test that asks for it gets it back


def test_the_private_redis_comes_back_for_the_next_test(private_redis):
    assert private_redis.answers()


def test_the_private_broker_and_database_fixtures(private_settings, private_rabbitmq,
                                                  private_postgres):
    assert private_settings.amqp_url == private_rabbitmq.url
    assert private_settings.pg_dsn == private_postgres.url
    private_rabbitmq.stop_app()  # the next test that asks for it gets it serving
    private_postgres.stop_immediately()


async def test_the_private_broker_and_database_come_back_for_the_next_test(private_settings):
    from engine.amqp.topology import EXCHANGE

    conn = await aiormq.connect(private_settings.amqp_url)
    try:
        channel = await conn.channel()
        await channel.exchange_declare(EXCHANGE, passive=True)  # topology declared
    finally:
        await conn.close()
    pg = await asyncpg.connect(private_settings.pg_dsn, timeout=10)
    try:
        assert await pg.fetchval("SELECT count(*) FROM seckill_logs WHERE false") == 0
    finally:
        await pg.close()
