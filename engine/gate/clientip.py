"""The client's address, for the per-IP limit: X-Forwarded-For only from our own proxies.

Anyone can send an X-Forwarded-For header, so it is believed only when the
TCP peer is one of `bff_trusted_proxies`. Then every line of the header is
read, joined in the order received (RFC 7230 section 3.2.2: several lines of a
list header are one comma-separated list), from the right (the hop our proxy
added) leftwards, past every trusted proxy: the first address that is not ours
is the client. Whatever is further left was written by the client itself and
is ignored. Reading only the first line would let a client choose its address:
a proxy such as HAProxy appends its own line after the client's.

What becomes a rate limiter's Redis key must be a plain IP address: a hop that
is not one (a name, a port, an IPv6 scope ID such as `fe80::1%eth0`, anything
longer than an address can be) leaves the request keyed by its peer, and an
address is always written in its one canonical form, so no two spellings of
an address get two limiters and no key grows with the header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from engine.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# the longest text of an IP address: eight IPv6 groups with an IPv4 tail
MAX_ADDRESS = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


def parse_proxies(text: str) -> tuple[Network, ...]:
    """`bff_trusted_proxies` as networks; a bad entry is a configuration error."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"bff_trusted_proxies: {item!r} is not an address or CIDR") \
                from None
    return tuple(out)


def parse_address(text: str) -> Address | None:
    """`text` as an IP address, or None when it is anything else (scope IDs included)."""
    text = text.strip()
    if not text or len(text) > MAX_ADDRESS:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return None
    return ip


Lines = str | bytes | Sequence[str | bytes]


def _joined(lines: Lines) -> str:
    """Every line of the header as one list, in the order received."""
    if isinstance(lines, (str, bytes)):
        lines = [lines]
    return ",".join(line.decode("latin-1") if isinstance(line, bytes) else line
                    for line in lines)


class ClientIp:
    def __init__(self, proxies: Iterable[Network]) -> None:
        self.proxies = tuple(proxies)

    def _trusted(self, ip: Address) -> bool:
        return any(ip in net for net in self.proxies)

    def trusts(self, peer: str | None) -> bool:
        """Whether the TCP peer `peer` is one of our proxies, whose headers we believe
        (X-Forwarded-For here, a `traceparent` in engine.gate.app)."""
        if not self.proxies or peer is None:
            return False
        try:
            return self._trusted(ipaddress.ip_address(peer))
        except ValueError:
            return False

    def of(self, peer: str | None, forwarded_for: Lines | None) -> str | None:
        """The client address of a request from `peer` carrying `forwarded_for`: the
        X-Forwarded-For header's lines (one line, as str or bytes, or all of them in
        the order received)."""
        if not self.proxies or not forwarded_for or peer is None:
            return peer
        try:  # (the socket's own address: a link-local proxy's may carry a scope ID)
            peer_ip = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if not self._trusted(peer_ip):
            return peer
        for hop in reversed(_joined(forwarded_for).split(",")):
            if not hop.strip():
                continue  # an empty list element (RFC 7230 section 7): not a hop
            ip = parse_address(hop)
            if ip is None:
                return peer  # garbage where an address belongs: keep the proxy's view
            if not self._trusted(ip):
                return str(ip)
        return peer
