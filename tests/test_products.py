"""The products table through engine.products, against the real PostgreSQL."""

from __future__ import annotations

import pytest

from engine.errors import InvalidInput, UnknownProduct
from engine.products import Product, fetch_products, get_product, upsert_product, validate_product


async def test_upsert_twice_updates(conn, product_id):
    await upsert_product(conn, Product(product_id, "a", 1, 1024, "", "img:1"))
    await upsert_product(conn, Product(product_id, "b", 8, 32768, "A100", "img:2"))
    assert await get_product(conn, product_id) == Product(product_id, "b", 8, 32768, "A100",
                                                          "img:2")


async def test_fetch_with_misses_and_unknown(conn, product_ids):
    known, missing = product_ids[:2]
    await upsert_product(conn, Product(known, "a", 1, 1, "", "i"))
    assert set(await fetch_products(conn, [known, missing])) == {known}
    with pytest.raises(UnknownProduct, match=f"product {missing}: no such product"):
        await get_product(conn, missing)


@pytest.mark.parametrize("product,field", [
    (Product(0, "a", 1, 1, "", "i"), "id"), (Product(1, "", 1, 1, "", "i"), "name"),
    (Product(1, "a", 0, 1, "", "i"), "cpus"), (Product(1, "a", 1, 2**31, "", "i"), "memory_mb"),
    (Product(1, "a", 1, 1, "", " "), "image"), (Product(1, "a", 1, 1, "g" * 201, "i"), "gpu"),
])
def test_validation_names_the_field(product, field):
    with pytest.raises(InvalidInput, match=f"^{field}: expected"):
        validate_product(product)
