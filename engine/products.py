"""The `products` table: what a sale sells (name and instance spec)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from engine.errors import InvalidInput, UnknownProduct

MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class Product:
    id: int
    name: str
    cpus: int
    memory_mb: int
    gpu: str
    image: str


def validate_product(product: Product) -> Product:
    """Raise InvalidInput naming the first bad field; the database would only say 'check'."""
    def bad(name: str, expected: str, got: object) -> InvalidInput:
        return InvalidInput(f"{name}: expected {expected}, got {got!r}")

    for name, number, limit in (("id", product.id, MAX_INT64),
                                ("cpus", product.cpus, MAX_INT32),
                                ("memory_mb", product.memory_mb, MAX_INT32)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= limit:
            raise bad(name, f"a positive integer up to {limit}", number)
    for name, text in (("name", product.name), ("image", product.image)):
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_NAME:
            raise bad(name, f"a non-empty text of at most {MAX_NAME} characters", text)
    if not isinstance(product.gpu, str) or len(product.gpu) > MAX_NAME:
        raise bad("gpu", f"a text of at most {MAX_NAME} characters", product.gpu)
    return product


UPSERT = """
INSERT INTO products (id, name, cpus, memory_mb, gpu, image) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, cpus = EXCLUDED.cpus,
    memory_mb = EXCLUDED.memory_mb, gpu = EXCLUDED.gpu, image = EXCLUDED.image,
    updated_at = now()
"""


async def upsert_product(conn: asyncpg.Connection, product: Product) -> None:
    await upsert_products(conn, [product])


async def upsert_products(conn: asyncpg.Connection, products: list[Product]) -> None:
    """Validate all, then write all in one round trip."""
    rows = [(p.id, p.name, p.cpus, p.memory_mb, p.gpu, p.image)
            for p in map(validate_product, products)]
    await conn.executemany(UPSERT, rows)


def gpu_product(product_id: int) -> Product:
    """The product demos, tests and benchmarks sell: an 8-core A100 instance."""
    return Product(product_id, f"GPU instance {product_id}", 8, 32768, "A100", "ubuntu:22.04")


async def fetch_products(conn: asyncpg.Connection, ids: Iterable[int]) -> dict[int, Product]:
    """All of `ids` that exist, in one query."""
    rows = await conn.fetch(
        "SELECT id, name, cpus, memory_mb, gpu, image FROM products WHERE id = ANY($1::bigint[])",
        list(ids))
    return {r["id"]: Product(*r.values()) for r in rows}


async def get_product(conn: asyncpg.Connection, product_id: int) -> Product:
    found = await fetch_products(conn, [product_id])
    if product_id not in found:
        raise UnknownProduct(f"product {product_id}: no such product (add it with "
                             "`seckill product add`)")
    return found[product_id]
