"""Schema, engine role and RabbitMQ topology against the real services."""

from __future__ import annotations

import uuid
from pathlib import Path

import aiormq
import asyncpg
import pytest

from engine.admin.migrate import apply_migrations, dbmate_invocation, declare_topology
from engine.amqp.topology import EXCHANGE, QUEUE_CREATED, RK_CREATED
from engine.config import ENGINE_ROLE
from engine.errors import ServiceUnavailable

SEED_COLUMNS = {
    "id": "bigint", "product_id": "bigint", "user_id": "bigint", "instance_id": "bigint",
    "stream_id": "character varying", "status": "character varying",
    "created_at": "timestamp with time zone", "updated_at": "timestamp with time zone",
    "sale_id": "character varying", "slot": "integer",
}


def test_migrations_twice_are_harmless(settings):
    out = apply_migrations(settings.pg_dsn)
    assert "Applying" not in out


async def test_seckill_logs_has_the_seed_columns_and_types(conn):
    rows = await conn.fetch("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_name = 'seckill_logs'")
    have = {r["column_name"]: r["data_type"] for r in rows}
    for name, kind in SEED_COLUMNS.items():
        assert have[name] == kind, name
    products = await conn.fetch("SELECT column_name FROM information_schema.columns "
                                "WHERE table_name = 'products'")
    assert {"id", "name", "cpus", "memory_mb", "gpu", "image"} <= {r[0] for r in products}


async def _row(conn, pid, stream_id, instance_id, sale="s", slot=1, status="PROCESSING"):
    await conn.execute(
        "INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id, sale_id, slot,"
        " status) VALUES ($1, 1, $2, $3, $4, $5, $6)", pid, instance_id, stream_id, sale, slot,
        status)


async def test_unique_indexes_refuse_what_they_must(conn, product_id):
    base = product_id * 1000
    await _row(conn, product_id, "1-1", base + 1, slot=1)
    with pytest.raises(asyncpg.UniqueViolationError, match="instance_id"):
        await _row(conn, product_id, "1-2", base + 1, slot=2)
    with pytest.raises(asyncpg.UniqueViolationError, match="order_key"):
        await _row(conn, product_id, "1-1", base + 3, slot=3)
    with pytest.raises(asyncpg.UniqueViolationError, match="slot_key"):
        await _row(conn, product_id, "1-4", base + 4, slot=1)
    await _row(conn, product_id, "1-5", base + 5, sale=None, slot=None)
    await _row(conn, product_id, "1-6", base + 6, sale=None, slot=None)  # NULLs never clash
    await conn.execute("UPDATE seckill_logs SET status = 'FAILED' WHERE instance_id = $1",
                       base + 1)
    await _row(conn, product_id, "1-7", base + 7, slot=1)  # a failed order's unit is sold again


async def test_a_released_unit_is_sold_again_a_releasing_one_is_not(conn, product_id):
    base = product_id * 1000
    await _row(conn, product_id, "2-1", base + 1, slot=1, status="RELEASING")
    with pytest.raises(asyncpg.UniqueViolationError, match="slot_key"):
        await _row(conn, product_id, "2-2", base + 2, slot=1)  # the instance still exists
    await conn.execute("UPDATE seckill_logs SET status = 'RELEASED', released_at = now()"
                       " WHERE instance_id = $1", base + 1)
    await _row(conn, product_id, "2-3", base + 3, slot=1)  # the waitlist's head, say
    with pytest.raises(asyncpg.CheckViolationError):
        await _row(conn, product_id, "2-4", base + 4, slot=4, status="GONE")


async def test_engine_role_has_least_privilege(settings, conn, product_id):
    await conn.execute("INSERT INTO products VALUES ($1, 'p', 1, 1, '', 'img')", product_id)
    dsn = settings.pg_dsn.replace("postgres@", f"{ENGINE_ROLE}@")
    engine = await asyncpg.connect(dsn)
    try:
        assert await engine.fetchval("SELECT count(*) FROM products WHERE id = $1",
                                     product_id) == 1
        await engine.execute("CREATE TEMP TABLE t (x int)")
        await _row(engine, product_id, "9-9", product_id * 1000 + 9)
        await engine.execute("UPDATE seckill_logs SET status = 'RUNNING' WHERE product_id = $1",
                             product_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await engine.execute("DELETE FROM seckill_logs WHERE product_id = $1", product_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await engine.execute("INSERT INTO products VALUES (1, 'p', 1, 1, '', 'i')")
    finally:
        await engine.close()


async def test_topology_twice_and_created_events_land_in_the_queue(settings):
    await declare_topology(settings.amqp_url)
    await declare_topology(settings.amqp_url)
    conn = await aiormq.connect(settings.amqp_url)
    try:
        ch = await conn.channel()
        await ch.queue_purge(QUEUE_CREATED)
        marker = uuid.uuid4().hex.encode()
        await ch.basic_publish(marker, exchange=EXCHANGE, routing_key=RK_CREATED)
        got = None
        for _ in range(50):
            got = await ch.basic_get(QUEUE_CREATED, no_ack=True)
            if got.body:
                break
        assert got is not None and got.body == marker
        declared = await ch.queue_declare(QUEUE_CREATED, passive=True)
        assert declared.message_count == 0
    finally:
        await conn.close()


async def test_unreachable_services_fail_clearly_with_passwords_masked():
    with pytest.raises(ServiceUnavailable) as err:
        await declare_topology("amqp://guest:s3cret@127.0.0.1:1/", timeout=2)
    assert "s3cret" not in str(err.value) and "guest:***@" in str(err.value)
    with pytest.raises(ServiceUnavailable) as err2:
        apply_migrations("postgresql://postgres:s3cret@127.0.0.1:1/x", timeout=30)
    assert "s3cret" not in str(err2.value)


def test_the_password_never_reaches_dbmates_command_line():
    cmd, env = dbmate_invocation("postgresql://postgres:s3cret@127.0.0.1:5432/x", Path("/m"))
    assert not any("s3cret" in part or "://" in part for part in cmd)
    assert env["DATABASE_URL"] == "postgres://postgres:s3cret@127.0.0.1:5432/x?sslmode=disable"
