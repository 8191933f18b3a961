"""systemd's notify protocol (`Type=notify`), without a dependency.

A datagram of `KEY=value` lines to the socket named in `$NOTIFY_SOCKET`;
a no-op when the variable is unset, so the supervisor can always call it.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send lines like `READY=1`; returns False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half the period systemd asked for, or 0."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6 / 2
