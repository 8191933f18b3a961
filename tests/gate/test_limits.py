"""Abuse limits and scheduled sales at the gate, end to end: the real BFF and Redis.

The limits and the window are judged inside the purchase's Lua call, before
any write, against Redis's clock; so every refusal here is also checked to
have left the stock and the stream as they were.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from support import add_products

from engine.gate.clientip import ClientIp, parse_proxies
from engine.gate.redis_gate import Gate, Limits, Window
from engine.testing.bff import Bff
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, engine_env

pytestmark = pytest.mark.timeout(120)


async def untouched(gate: Gate, pid: int, stock: int, entries: int) -> bool:
    return ((await gate.sale_state(pid)).stock, await gate.redis.xlen(gate.keys.stream(pid))
            ) == (stock, entries)


async def test_one_user_past_the_burst_gets_429_and_writes_nothing(settings, gate, product_id):
    server = Bff(settings, bff_user_rate=0.5, bff_user_burst=3)
    try:
        await gate.open_sale(product_id, 5)
        async with httpx.AsyncClient(base_url=server.url) as client:
            buy = f"/api/v1/seckill/{product_id}"
            codes = [(await client.post(buy, json={"user_id": 9})).status_code
                     for _ in range(3)]
            assert codes == [202, 409, 409]
            r = await client.post(buy, json={"user_id": 9})
            assert r.status_code == 429 and r.json()["limit"] == "user"
            assert 1 <= int(r.headers["retry-after"]) <= 2
            # another user is not slowed by this one
            assert (await client.post(buy, json={"user_id": 10})).status_code == 202
        assert await untouched(gate, product_id, 3, 2)
        ttl = await gate.redis.pttl(gate.keys.user_limiter(product_id, 9))
        assert 0 < ttl <= 8000  # the limiter expires by itself
        assert f"{{{product_id}}}" in gate.keys.user_limiter(product_id, 9)
    finally:
        server.stop()


async def test_n_plus_one_buyers_from_one_address_and_spoofed_forwarded_for(settings, gate,
                                                                             product_id):
    # the peer (127.0.0.1) is not a trusted proxy: its X-Forwarded-For is ignored
    server = Bff(settings, bff_ip_rate=0.5, bff_ip_burst=3, bff_trusted_proxies="10.0.0.0/8")
    try:
        await gate.open_sale(product_id, 10)
        async with httpx.AsyncClient(base_url=server.url) as client:
            buy = f"/api/v1/seckill/{product_id}"
            for uid in (1, 2, 3):
                r = await client.post(buy, json={"user_id": uid},
                                      headers={"x-forwarded-for": f"198.51.100.{uid}"})
                assert r.status_code == 202
            r = await client.post(buy, json={"user_id": 4},
                                  headers={"x-forwarded-for": "198.51.100.4"})
            assert r.status_code == 429 and r.json()["limit"] == "ip"
            assert int(r.headers["retry-after"]) >= 1
        assert await untouched(gate, product_id, 7, 3)
        assert await gate.redis.exists(gate.keys.ip_limiter(product_id, "127.0.0.1"))
        assert not await gate.redis.exists(gate.keys.ip_limiter(product_id, "198.51.100.4"))
    finally:
        server.stop()


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(settings, gate,
                                                                   product_id):
    server = Bff(settings, bff_ip_rate=0.5, bff_ip_burst=1, bff_trusted_proxies="127.0.0.1")
    try:
        await gate.open_sale(product_id, 10)
        async with httpx.AsyncClient(base_url=server.url) as client:
            buy = f"/api/v1/seckill/{product_id}"
            for uid in (1, 2, 3):  # three clients behind our proxy: one each
                r = await client.post(buy, json={"user_id": uid}, headers={
                    "x-forwarded-for": f"203.0.113.9, 198.51.100.{uid}"})
                assert r.status_code == 202, r.text
            r = await client.post(buy, json={"user_id": 4}, headers={
                "x-forwarded-for": "198.51.100.1"})  # the first client again
            assert r.status_code == 429
        assert await gate.redis.exists(gate.keys.ip_limiter(product_id, "198.51.100.2"))
        assert not await gate.redis.exists(gate.keys.ip_limiter(product_id, "203.0.113.9"))
    finally:
        server.stop()


def test_client_ip_reads_forwarded_for_right_to_left_past_trusted_hops():
    ip = ClientIp(parse_proxies("10.0.0.0/8, 192.0.2.1"))
    assert ip.of("10.1.1.1", b"1.1.1.1, 2.2.2.2, 192.0.2.1") == "2.2.2.2"
    assert ip.of("10.1.1.1", b"2.2.2.2") == "2.2.2.2"
    assert ip.of("8.8.8.8", b"2.2.2.2") == "8.8.8.8"  # untrusted peer: header ignored
    assert ip.of("10.1.1.1", b"not-an-ip") == "10.1.1.1"
    assert ip.of("10.1.1.1", None) == "10.1.1.1"
    assert ClientIp(()).of("10.1.1.1", b"2.2.2.2") == "10.1.1.1"


async def test_a_sale_overrides_the_limits(settings, gate, product_id):
    server = Bff(settings, bff_user_rate=0)  # no per-user limit by default ...
    try:
        await gate.open_sale(product_id, 5, limits=Limits(user_rate=0.5, user_burst=1))
        async with httpx.AsyncClient(base_url=server.url) as client:
            buy = f"/api/v1/seckill/{product_id}"
            assert (await client.post(buy, json={"user_id": 1})).status_code == 202
            # ... but this sale has one
            assert (await client.post(buy, json={"user_id": 1})).status_code == 429
    finally:
        server.stop()


async def test_before_the_start_425_after_the_end_410(settings, gate, product_id):
    server = Bff(settings)
    now_ms = int(time.time() * 1000)
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            buy, page = f"/api/v1/seckill/{product_id}", f"/api/v1/seckill/{product_id}"
            await gate.open_sale(product_id, 5, window=Window(start_ms=now_ms + 3_600_000))
            r = await client.post(buy, json={"user_id": 1})
            assert r.status_code == 425 and r.json()["start_ms"] == now_ms + 3_600_000
            assert r.json()["start"].endswith("Z")
            info = await client.get(page)
            assert info.json()["state"] == "scheduled"
            assert info.headers["cache-control"] == "public, max-age=1"
            assert abs(info.json()["server_time_ms"] - now_ms) < 60_000
            await gate.open_sale(product_id, 5, window=Window(end_ms=now_ms - 1000))
            r = await client.post(buy, json={"user_id": 1})
            assert (r.status_code, r.json()) == (410, {"status": "ended"})
            assert (await client.get(page)).json()["state"] == "ended"
            assert await untouched(gate, product_id, 5, 0)
            await gate.open_sale(product_id, 5, window=Window(now_ms - 1000, now_ms + 60_000))
            assert (await client.get(page)).json()["state"] == "open"
            assert (await client.post(buy, json={"user_id": 1})).status_code == 202
    finally:
        server.stop()


async def test_the_sale_page_never_reads_postgresql(settings, gate, product_id):
    server = Bff(settings, pg_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            page = f"/api/v1/seckill/{product_id}"
            assert (await client.get(page)).json()["state"] == "closed"
            await gate.open_sale(product_id, 1)
            info = (await client.get(page)).json()
            assert (info["state"], info["start"], info["end"]) == ("open", None, None)
            await client.post(page, json={"user_id": 1})
            assert (await client.get(page)).json()["state"] == "sold_out"
    finally:
        server.stop()


async def test_sale_open_takes_a_window_and_limits(settings, gate, product_id):
    await add_products(settings, [product_id])

    def sale_open(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SECKILL, "sale", "open", "--product", str(product_id),
                               "--stock", "3", *args], env=engine_env(settings),
                              capture_output=True, text=True, timeout=60)

    done = sale_open("--start-at", "2099-01-01T00:00:00Z", "--end-at", "4102448400",
                     "--user-rate", "1.5")
    assert done.returncode == 0, done.stderr
    window = await gate.redis.hgetall(gate.keys.window(product_id))
    assert window[b"start"] == b"4070908800000" and window[b"end"] == b"4102448400000"
    assert window[b"user_rate"] == b"1.5"
    assert (await gate.buy(product_id, 1)).outcome == "not_started"
    done = sale_open("--start-at", "yesterday")
    assert done.returncode == 2 and "--start-at: expected ISO 8601" in done.stderr
