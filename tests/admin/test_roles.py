"""The BFF's and the Resource Domain's own PostgreSQL roles (made by `seckill migrate`):
each can do its job and nothing past it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine.config import BFF_ROLE, RD_ROLE, role_dsn


async def test_bff_role_reads_only_the_columns_of_an_order(settings, conn, product_id):
    await conn.execute("INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id)"
                       " VALUES ($1, 5, $2, '1-1')", product_id, product_id * 10)
    bff = await asyncpg.connect(settings.bff_dsn())
    try:
        assert await bff.fetchval("SELECT current_user") == "seckill_bff"
        row = await bff.fetchrow(
            "SELECT status, instance_id, endpoint, reason, compensated_at FROM seckill_logs "
            "WHERE product_id = $1 AND user_id = 5 ORDER BY id DESC LIMIT 1", product_id)
        assert row["instance_id"] == product_id * 10
        # and the IDs a release request names (engine/gate/releases.py)
        assert await bff.fetchval("SELECT stream_id FROM seckill_logs WHERE product_id = $1",
                                  product_id) == "1-1"
        for sql in ("SELECT slot FROM seckill_logs LIMIT 1",
                    "SELECT * FROM products LIMIT 1",
                    "UPDATE seckill_logs SET status = 'RUNNING' WHERE product_id = 0",
                    "INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id) "
                    "VALUES (1, 1, 1, '0-1')"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await bff.execute(sql)
    finally:
        await bff.close()


async def test_resource_domain_role_owns_its_schema_and_nothing_else(settings):
    rd = await asyncpg.connect(settings.rd_dsn())
    try:
        assert await rd.fetchval("SELECT current_user") == "seckill_resource_domain"
        await rd.execute("CREATE TABLE IF NOT EXISTS resource_domain.probe (x int)")
        await rd.execute("INSERT INTO resource_domain.probe VALUES (1)")
        for sql in ("SELECT count(*) FROM seckill_logs", "SELECT count(*) FROM products",
                    "CREATE SCHEMA elsewhere"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await rd.execute(sql)
    finally:
        await rd.close()


def _database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@pytest.mark.parametrize("role", [BFF_ROLE, RD_ROLE])
async def test_the_roles_reach_no_other_database(settings, conn, role):
    """PUBLIC's CONNECT is gone from seckill's database (the roles have theirs by name) and
    from the cluster's own ones, so these logins open nothing else there."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for data"):
        await asyncpg.connect(role_dsn(_database(settings.pg_dsn, "template1"), role))
    for db in ("postgres", "template1", await conn.fetchval("SELECT current_database()")):
        for privilege in ("CONNECT", "TEMPORARY"):
            assert not await conn.fetchval("SELECT has_database_privilege('public', $1, $2)",
                                           db, privilege), (db, privilege)


@pytest.mark.parametrize("role", [BFF_ROLE, RD_ROLE])
async def test_the_roles_cannot_create_temp_tables(settings, role):
    """Only the engine stages rows in a temp table (tests/admin/test_migrate.py)."""
    other = await asyncpg.connect(role_dsn(settings.pg_dsn, role))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="temporary tables"):
            await other.execute("CREATE TEMP TABLE t (x int)")
    finally:
        await other.close()


@pytest.mark.parametrize("role,timeout", [(BFF_ROLE, "5s"), (RD_ROLE, "30s"),
                                          ("seckill_engine", "1min")])
async def test_each_role_has_a_statement_timeout(settings, role, timeout):
    login = await asyncpg.connect(role_dsn(settings.pg_dsn, role))
    try:
        assert await login.fetchval("SHOW statement_timeout") == timeout
    finally:
        await login.close()


async def test_a_runaway_bff_query_is_cancelled(settings):
    bff = await asyncpg.connect(settings.bff_dsn())
    try:
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await bff.execute("SELECT pg_sleep(8)")
    finally:
        await bff.close()


def test_role_dsn_drops_the_other_users_password():
    assert role_dsn("postgresql://postgres:pw@h1,h2:5432/db?password=x&sslmode=require",
                    "seckill_bff") == "postgresql://seckill_bff@h1,h2:5432/db?sslmode=require"
