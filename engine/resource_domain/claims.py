"""Whose claim is it: a Resource Domain's claims belong to it only while it lives.

Every Resource Domain process holds a PostgreSQL session advisory lock
(`pg_advisory_lock(LOCK_SPACE, owner)`) on a connection of its own, for as long
as it runs, and stamps its `owner` number on every instance it claims. A process
that dies (SIGKILL, a lost host) loses its session, and PostgreSQL releases the
lock at once; any other Resource Domain that meets one of its claims (the broker
redelivers the events it held) sees that no session holds the owner's lock any
more and takes the claim over. Recovery is bounded by how fast the broker and
PostgreSQL notice a dead connection, not by a constant (issue 23, item 7).

A Resource Domain whose lock connection breaks (PostgreSQL restarted, a network
cut) cannot know whether someone took its claims in between: it takes a new owner
number, and writes an outcome only where its claim is still the one recorded
(`owner` unchanged), so two processes never both record an instance.
"""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

from engine.connections import PG_ERRORS

log = logging.getLogger("seckill.resource_domain")

# The first key of every Resource Domain advisory lock (the second is the owner).
LOCK_SPACE = 0x5EC7
# How often the lock's connection is checked: a broken one is noticed within this.
CHECK_S = 1.0

# Owners whose process is alive: a session of this database holds their lock.
LIVE_OWNERS = f"""
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = {LOCK_SPACE} AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
# A claim in `status` whose owner is dead (or unknown: made before owners existed).
DEAD_CLAIM = f"(owner IS NULL OR owner NOT IN ({LIVE_OWNERS}))"


class OwnerLock:
    """This process's owner number, backed by an advisory lock on its own connection."""

    def __init__(self, dsn: str, *, timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._owner = 0
        self._checked = 0.0
        self._lock = asyncio.Lock()

    async def owner(self) -> int:
        """The owner number to claim with, (re)taking the lock first if it was lost."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._conn is not None and loop.time() - self._checked >= CHECK_S:
                await self._check()
            if self._conn is None or self._conn.is_closed():
                await self._take()
            return self._owner

    async def _check(self) -> None:
        assert self._conn is not None
        try:
            await self._conn.fetchval("SELECT 1", timeout=self.timeout)
            self._checked = asyncio.get_running_loop().time()
        except PG_ERRORS as exc:
            log.warning("claims lock connection lost (%s); taking a new owner number", exc,
                        extra={"event": "rd_owner_lost", "owner": self._owner})
            self._conn.terminate()
            self._conn = None

    async def _take(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
        try:
            while True:
                owner = random.randrange(1, 2**31)
                if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_SPACE,
                                       owner):
                    break
        except BaseException:
            conn.terminate()
            raise
        self._conn, self._owner = conn, owner
        self._checked = asyncio.get_running_loop().time()
        log.info("claiming as owner %d", owner, extra={"event": "rd_owner", "owner": owner})

    async def keep_alive(self, stopping: asyncio.Event) -> None:
        """Check the lock's connection every CHECK_S until `stopping`: a lost one is
        replaced before the next claim rather than found out by it."""
        while not stopping.is_set():
            try:
                await self.owner()
            except PG_ERRORS as exc:
                log.warning("claims lock: %s", exc, extra={"event": "rd_owner_retry"})
            try:
                await asyncio.wait_for(stopping.wait(), CHECK_S)
            except TimeoutError:
                pass

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # noqa: BLE001 - closing a broken connection may fail any way
                conn.terminate()
