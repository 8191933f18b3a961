"""Slow and abusive clients against the real BFF: a body that trickles in is cut off
with 408 and holds no in-flight slot meanwhile, so buyers keep being served."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis
from support import established_tcp

from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.bff import Bff
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def slow_body(port: int, pid: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Headers promising a 40-byte body, then 5 bytes of it, then nothing (the writer is
    returned to keep the connection open: a collected writer closes it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /api/v1/seckill/{pid} HTTP/1.1\r\nhost: x\r\n"
                 "content-type: application/json\r\ncontent-length: 40\r\n\r\n{\"use".encode())
    await writer.drain()
    return reader, writer


async def test_four_slow_bodies_do_not_stop_a_fast_buyer(settings, product_id):
    server = Bff(settings, bff_max_inflight=2, bff_body_timeout=8)
    redis = Redis.from_url(settings.redis_url)
    try:
        await Gate(redis, Keys(settings.key_prefix)).open_sale(product_id, 5)
        clients = [await slow_body(server.port, product_id) for _ in range(4)]
        slow = [reader for reader, _ in clients]
        ports = {writer.get_extra_info("sockname")[1] for _, writer in clients}

        async def read_by_the_bff() -> bool:
            """Every byte they sent has reached the BFF's host (acknowledged) and has been
            read there: they are stuck in their bodies now (or were answered already)."""
            return not any((local in ports and remote == server.port and unacked)
                           or (local == server.port and remote in ports and unread)
                           for local, remote, unacked, unread in established_tcp())

        await wait_for(read_by_the_bff, 10, "the slow clients' bytes read by the BFF",
                       interval=0.02)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            r = await client.post(f"/api/v1/seckill/{product_id}", json={"user_id": 1})
        assert r.status_code == 202, r.text  # not 429: the slow ones hold no slot
        # and they were still waiting: nothing answered yet
        assert [reader._buffer for reader in slow] == [b""] * 4, [r._buffer for r in slow]
        assert not any(reader.at_eof() for reader in slow)
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(4096), 20)
                                         for reader in slow))
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert await redis.xlen(Keys(settings.key_prefix).stream(product_id)) == 1
    finally:
        server.stop()
        await redis.aclose()


async def test_a_client_that_never_finishes_its_headers_is_cut_off(settings, product_id):
    server = Bff(settings, bff_header_timeout=1)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"POST /api/v1/seckill/{product_id} HTTP/1.1\r\nhost: x\r\n".encode())
        await writer.drain()  # ... and never the blank line that ends the headers
        closed = await asyncio.wait_for(reader.read(4096), 20)
        assert not closed.startswith(b"HTTP/1.1 2")  # refused or dropped, never served
        assert reader.at_eof()
        writer.close()
    finally:
        server.stop()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """How long until the server closed the connection (it answers nothing first, or
    a 408 at most); fails past `seconds`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await asyncio.wait_for(reader.read(), seconds)
    assert answer == b"" or answer.startswith(b"HTTP/1.") and b" 408 " in answer[:13], \
        answer[:80]
    return loop.time() - started


async def test_the_admin_port_cuts_off_a_partial_request_as_the_public_one(settings):
    server = Bff(settings, bff_header_timeout=1)
    writers = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.admin_port)
        writers.append(writer)
        writer.write(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")  # never the blank line
        await writer.drain()
        assert await closed_within(reader, 6) < 4
        # a header trickled a byte at a time is cut off too: the bound is on the whole
        # request, not on each read
        reader, writer = await asyncio.open_connection("127.0.0.1", server.admin_port)
        writers.append(writer)
        writer.write(b"GET /metrics HTTP/1.1\r\nx-slow: ")
        closing = asyncio.ensure_future(closed_within(reader, 6))
        while not closing.done():
            writer.write(b"a")
            await asyncio.sleep(0.2)
        assert closing.result() < 4
        async with httpx.AsyncClient() as client:  # and it still serves
            assert (await client.get(server.admin_url + "/healthz")).status_code == 200
    finally:
        for writer in writers:
            writer.close()
        server.stop()
