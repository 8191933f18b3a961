"""X-Forwarded-For behind trusted proxies (issue 21), on the real BFF and Redis.

A proxy such as HAProxy appends its own X-Forwarded-For line after whatever
the client sent: the client's address is the right-most untrusted hop of all
the lines joined, never the first line. And what becomes a rate limiter's
Redis key is a canonical IP address, never a client's text.
"""

from __future__ import annotations

import httpx
import pytest

from engine.gate.clientip import ClientIp, parse_proxies
from engine.gate.redis_gate import Gate
from engine.testing.bff import Bff

pytestmark = pytest.mark.timeout(120)

ATTACKER, VICTIM, OTHER = "203.0.113.7", "192.0.2.50", "203.0.113.8"


@pytest.fixture(params=["rsgi", "asgi"])
def proxied(settings, request):
    """The BFF behind a trusted proxy (this test, at 127.0.0.1), 3 attempts per address."""
    server = Bff(settings, bff_ip_rate=0.1, bff_ip_burst=3, bff_trusted_proxies="127.0.0.1",
                 bff_interface=request.param)
    yield server
    server.stop()


def lines(*values: str) -> list[tuple[str, str]]:
    """X-Forwarded-For header lines, in order: the client's first, the proxy's last."""
    return [("x-forwarded-for", v) for v in values]


async def ip_limiters(gate: Gate, pid: int) -> list[bytes]:
    return [k async for k in gate.redis.scan_iter(match=gate.keys.ip_limiter(pid, "*"))]


async def test_a_second_line_from_the_proxy_names_the_client(proxied, gate, product_id):
    await gate.open_sale(product_id, 50)
    buy = f"/api/v1/seckill/{product_id}"
    async with httpx.AsyncClient(base_url=proxied.url) as client:
        # naming a victim's address in the client's own line drains only the attacker
        for uid in (1, 2, 3):
            r = await client.post(buy, json={"user_id": uid}, headers=lines(VICTIM, ATTACKER))
            assert r.status_code == 202, r.text
        r = await client.post(buy, json={"user_id": 4}, headers=lines(VICTIM))
        assert r.status_code == 202, r.text  # the victim's own first attempt
        # a client choosing a new address on each attempt still gets its limit's 3
        codes = [(await client.post(buy, json={"user_id": 10 + n},
                                    headers=lines(f"198.51.100.{n}", OTHER))).status_code
                 for n in range(8)]
    assert codes == [202] * 3 + [429] * 5
    limiters = {k.decode() for k in await ip_limiters(gate, product_id)}
    assert limiters == {gate.keys.ip_limiter(product_id, ip) for ip in (ATTACKER, VICTIM, OTHER)}


async def test_no_limiter_key_from_a_client_s_text(proxied, gate, product_id):
    """A scope ID is no address (fe80::1%<anything> made a 40,046-byte key): the
    request is keyed by its peer; an address gets one key however it is spelt."""
    await gate.open_sale(product_id, 50)
    buy = f"/api/v1/seckill/{product_id}"
    async with httpx.AsyncClient(base_url=proxied.url) as client:
        r = await client.post(buy, json={"user_id": 1},
                              headers=lines("fe80::1%" + "*?A" * 1300))
        assert r.status_code == 202, r.text
        for uid, spelling in ((2, "2001:DB8::1"), (3, "2001:0db8:0:0::1")):
            r = await client.post(buy, json={"user_id": uid}, headers=lines(spelling))
            assert r.status_code == 202, r.text
    limiters = sorted(k.decode() for k in await ip_limiters(gate, product_id))
    assert limiters == sorted(gate.keys.ip_limiter(product_id, ip)
                              for ip in ("127.0.0.1", "2001:db8::1"))


def test_hops_are_read_across_lines_from_the_right():
    ip = ClientIp(parse_proxies("10.0.0.0/8, 192.0.2.1"))
    assert ip.of("10.1.1.1", ["6.6.6.6", "2.2.2.2"]) == "2.2.2.2"
    assert ip.of("10.1.1.1", [b"6.6.6.6, 1.1.1.1", b"2.2.2.2, 10.0.0.9", "192.0.2.1"]) == \
        "2.2.2.2"
    assert ip.of("10.1.1.1", ["2.2.2.2,", " , 10.0.0.1"]) == "2.2.2.2"  # empty elements
    assert ip.of("10.1.1.1", ["10.0.0.2", "10.0.0.3"]) == "10.1.1.1"  # all ours
    assert ip.of("10.1.1.1", []) == "10.1.1.1"
    assert ip.of("8.8.8.8", ["2.2.2.2"]) == "8.8.8.8"  # untrusted peer: header ignored
    assert ip.of("10.1.1.1", ["2001:DB8:0::1"]) == "2001:db8::1"
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"  # still an address
    assert ip.of("10.1.1.1", [longest]) == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


@pytest.mark.parametrize("hop", ["fe80::1%eth0", "fe80::1%" + "A" * 40_000, "1.2.3.4:80",
                                 "[2001:db8::1]", "01.2.3.4", "localhost", "unknown",
                                 "1.2.3.4 5.6.7.8", "\u0661.2.3.4"])
def test_what_is_not_an_address_is_refused(hop):
    ip = ClientIp(parse_proxies("10.0.0.0/8"))
    assert ip.of("10.1.1.1", f"9.9.9.9, {hop}") == "10.1.1.1"
    assert ip.of("10.1.1.1", ["9.9.9.9", hop]) == "10.1.1.1"


@pytest.mark.parametrize("peer,trusted", [("127.0.0.1", True), ("10.1.2.3", True),
                                          ("10.2.0.1", False), (None, False),
                                          ("not-an-ip", False), ("::1", False)])
def test_only_a_listed_proxy_is_trusted_with_its_headers(peer, trusted):
    assert ClientIp(parse_proxies("127.0.0.1, 10.1.0.0/16")).trusts(peer) is trusted
    assert ClientIp(()).trusts(peer) is False
