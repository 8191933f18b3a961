"""The client's address, for the per-IP limit: X-Forwarded-For only from our own proxies.

Anyone can send an X-Forwarded-For header, so it is believed only when the
TCP peer is one of `bff_trusted_proxies`. Then the header is read from the
right (the hop our proxy added) leftwards, past every trusted proxy: the first
address that is not ours is the client. Whatever is further left was written
by the client itself and is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from engine.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class ClientIp:
    def __init__(self, proxies: Iterable[Network]) -> None:
        self.proxies = tuple(proxies)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def of(self, peer: str | None, forwarded_for: str | bytes | None) -> str | None:
        """The client address of a request from `peer` carrying `forwarded_for`."""
        if not self.proxies or not forwarded_for or peer is None or not self._trusted(peer):
            return peer
        if isinstance(forwarded_for, bytes):
            forwarded_for = forwarded_for.decode("latin-1")
        hops = [h.strip() for h in forwarded_for.split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # garbage where an address belongs: keep the proxy's view
        return peer
