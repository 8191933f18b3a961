"""Stage 2 helper: products looked up through a per-worker cache.

A batch asks for its products once; all misses of a batch cost one query.
Unknown products are remembered briefly too, so a stream full of orders for
a product that does not exist does not cost a query per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import asyncpg

from .events import product_prefix
from .products import Product, fetch_products

NEGATIVE_TTL = 2.0


class Catalog:
    """Product rows and their pre-serialized event prefix, with a TTL."""

    def __init__(self, pool: asyncpg.Pool, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._ttl = ttl
        self._clock = clock
        self._known: dict[int, tuple[float, Product, bytes]] = {}
        self._unknown: dict[int, float] = {}

    async def lookup(self, ids: Iterable[int]) -> dict[int, tuple[Product, bytes]]:
        """(product, event prefix) of every known ID; unknown ones are absent."""
        now = self._clock()
        found: dict[int, tuple[Product, bytes]] = {}
        missing = []
        for pid in set(ids):
            hit = self._known.get(pid)
            if hit is not None and hit[0] > now:
                found[pid] = (hit[1], hit[2])
            elif self._unknown.get(pid, 0.0) <= now:
                missing.append(pid)
        if missing:
            async with self._pool.acquire() as conn:
                rows = await fetch_products(conn, missing)
            for pid in missing:
                product = rows.get(pid)
                if product is None:
                    self._unknown[pid] = now + NEGATIVE_TTL
                    continue
                prefix = product_prefix(product)
                self._known[pid] = (now + self._ttl, product, prefix)
                found[pid] = (product, prefix)
        return found
