"""A multi-host PostgreSQL DSN (`h1,h2/db?target_session_attrs=read-write`): the engine's
and the BFF's asyncpg pools take it as it is; `seckill migrate` translates it for dbmate
(one host) by asking each host whether it accepts writes."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import pytest

from engine.admin.migrate import apply_migrations, pg_hosts, single_host, writable_dsn
from engine.connections import create_pg_pool
from engine.errors import ServiceUnavailable
from engine.testing.nodes import PostgresNode, free_port

pytestmark = pytest.mark.timeout(180)


def multi_host(dsn: str, *before: str) -> str:
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    query = "target_session_attrs=read-write"
    return parts._replace(netloc=f"{user}@{','.join([*before, host])}", query=query).geturl()


def test_hosts_of_a_dsn_and_one_of_them_alone():
    dsn = "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=disable"
    assert pg_hosts(dsn) == ["h1:5432", "h2:5433"]
    assert single_host(dsn, "h2:5433") == "postgresql://u:pw@h2:5433/db?sslmode=disable"
    assert writable_dsn("postgresql://u@h1/db") == "postgresql://u@h1/db"


async def test_engine_pool_and_migrate_skip_a_dead_first_host(settings):
    dsn = multi_host(settings.pg_dsn, f"127.0.0.1:{free_port()}")
    pool = await create_pg_pool(settings.replace(pg_dsn=dsn), size=2)
    try:
        assert await pool.fetchval("SELECT count(*) >= 0 FROM seckill_logs")
    finally:
        await pool.close()
    live = urlsplit(settings.pg_dsn)
    chosen = await asyncio.to_thread(writable_dsn, dsn)
    assert chosen.endswith(live.netloc.rpartition("@")[2] + live.path)
    await asyncio.to_thread(apply_migrations, dsn)  # up to date: dbmate reached the live host


async def test_a_read_only_first_host_is_passed_over_for_the_primary(settings):
    """A server whose sessions are read-only answers like a standby does."""
    standby = PostgresNode(settings=("fsync=off", "default_transaction_read_only=on"))
    try:
        await asyncio.to_thread(standby.start)
        # a standby has the primary's databases (read-only sessions may still create one)
        conn = await asyncpg.connect(standby.dsn("postgres"))
        try:
            await conn.execute("SET default_transaction_read_only = off")
            await conn.execute(f'CREATE DATABASE "{urlsplit(settings.pg_dsn).path[1:]}"')
        finally:
            await conn.close()
        dsn = multi_host(settings.pg_dsn, f"127.0.0.1:{standby.port}")
        assert f":{standby.port}" not in await asyncio.to_thread(writable_dsn, dsn)
        pool = await create_pg_pool(settings.replace(pg_dsn=dsn), size=1)
        try:
            assert await pool.fetchval("SHOW transaction_read_only") == "off"
        finally:
            await pool.close()
        only_standby = multi_host(standby.url, f"127.0.0.1:{free_port()}")
        with pytest.raises(ServiceUnavailable, match="no host accepts writes"):
            await asyncio.to_thread(writable_dsn, only_standby)
    finally:
        standby.destroy()
