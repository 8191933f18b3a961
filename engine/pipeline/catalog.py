"""The look-up stage of a batch: products found through a per-worker cache, and
orders of unknown products set aside as dead letters.

A batch asks for its products once; all misses of a batch cost one query.
Unknown products are not cached: an order is dead-lettered as
`unknown_product` only on a fresh answer, so a product added a moment ago
(and its replayed dead letters) is found at once. The query has a timeout
like every other wait on the database: a locked or hung server fails the
lookup with `DatabaseFailed`, which the pipeline retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import asyncpg

from engine.connections import PG_ERRORS
from engine.errors import DatabaseFailed
from engine.pipeline.events import product_prefix
from engine.pipeline.orders import UNKNOWN_PRODUCT, DeadLetter, Order, order_fields
from engine.products import Product, fetch_products


class Catalog:
    """Product rows and their pre-serialized event prefix, with a TTL."""

    def __init__(self, pool: asyncpg.Pool, ttl: float, *, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._known: dict[int, tuple[float, Product, bytes]] = {}

    async def lookup(self, ids: Iterable[int]) -> dict[int, tuple[Product, bytes]]:
        """(product, event prefix) of every known ID; unknown ones are absent."""
        now = self._clock()
        found: dict[int, tuple[Product, bytes]] = {}
        missing = []
        for pid in set(ids):
            hit = self._known.get(pid)
            if hit is not None and hit[0] > now:
                found[pid] = (hit[1], hit[2])
            else:
                missing.append(pid)
        if missing:
            rows = await self._fetch(missing)
            for pid in missing:
                product = rows.get(pid)
                if product is None:
                    continue
                prefix = product_prefix(product)
                self._known[pid] = (now + self._ttl, product, prefix)
                found[pid] = (product, prefix)
        return found

    async def _fetch(self, ids: list[int]) -> dict[int, Product]:
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
                return await fetch_products(conn, ids)
        except PG_ERRORS as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise DatabaseFailed(f"looking up {len(ids)} products: {why}") from exc


def drop_unknown(orders: list[Order], known: dict[int, object],
                 dead: list[DeadLetter]) -> list[Order]:
    """The orders of `known` products; the others become dead letters, added to `dead`."""
    kept = []
    for o in orders:
        if o.product_id in known:
            kept.append(o)
        else:
            dead.append(DeadLetter(o.stream, o.stream_id, o.product_id, order_fields(o),
                                   UNKNOWN_PRODUCT,
                                   f"product {o.product_id} is not in the products table",
                                   entry_id=o.entry_id))
    return kept
