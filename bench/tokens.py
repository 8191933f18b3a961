"""Buyers with verified identities for the HTTP benchmark: minted tokens, warmed per worker.

Issue 13 measures the BFF with authentication on and "the buyer's token already
verified once" (a buyer who retries, or who looked at the sale before it
opened). The verified-token cache is per process, so a token counts as warm
only once every Granian worker has verified it. Which worker holds a connection
is the kernel's choice; the warm-up reads it from /proc (the accepted socket's
inode in /proc/net/tcp, found among the worker's file descriptors), then sends
each token to every worker: a GET of another user's order, refused 403 after
the token is verified and before Redis or PostgreSQL are touched.

Tokens are RS256, signed with a development key made by engine/gate/devkeys.py
(as `seckill keys init` does); signing costs about 0.6 ms each, so a run mints
its pool once, in one process per core, and every round reuses it (each round
starts a new BFF, whose caches start empty, and reopens the sales with their
buyers cleared).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ServiceUnavailable
from engine.gate.devkeys import DevIssuer, init_keys

from .enginerun import socket_inodes, tcp_rows

TTL = 4 * 3600  # longer than any run of the suite
WARM_PATH = "/api/v1/seckill/{pid}/users/1"  # no token names user 1: always 403
PIPELINE = 200  # requests written at once on one warm-up connection
CONNECTIONS_PER_WORKER = 2
FIND_TIMEOUT = 10.0


@dataclass(frozen=True)
class TokenFile:
    """`count` lines of "<user id> <token>", users first_user .. first_user + count - 1."""

    path: Path
    first_user: int
    count: int

    def lines(self) -> list[tuple[int, bytes]]:
        out = []
        for line in self.path.read_bytes().splitlines():
            uid, token = line.split(b" ", 1)
            out.append((int(uid), token))
        return out


class Issuer:
    """A development key pair in `directory` and the token files minted with it."""

    def __init__(self, directory: Path, *, issuer: str, audience: str) -> None:
        self.directory = directory
        self.jwks, self.private = init_keys(directory)
        self.issuer, self.audience = issuer, audience

    def mint(self, name: str, first_user: int, count: int, processes: int) -> TokenFile:
        """`count` tokens, one per user, written to `name`.tokens; in `processes`
        processes (signing is the cost)."""
        share = -(-count // processes)
        jobs = [(str(self.private), self.issuer, self.audience, first_user + i * share,
                 min(share, count - i * share)) for i in range(processes) if i * share < count]
        with ProcessPoolExecutor(len(jobs),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_mint_range, jobs))
        path = self.directory / f"{name}.tokens"
        path.write_bytes(b"".join(parts))
        return TokenFile(path, first_user, count)


def _mint_range(job: tuple[str, str, str, int, int]) -> bytes:
    private, issuer, audience, first, count = job
    dev = DevIssuer(private, issuer=issuer, audience=audience)
    return b"".join(b"%d %s\n" % (uid, dev.token(uid, TTL).encode())
                    for uid in range(first, first + count))


# --- which worker holds a connection -------------------------------------------------

def _accepted_inodes(server_port: int) -> dict[int, int]:
    """client port -> inode of the server's accepted socket, for connections to
    `server_port` on this machine (IPv4 and IPv6 tables)."""
    out: dict[int, int] = {}
    for f in tcp_rows():
        local, remote, inode = f[1], f[2], int(f[9])
        if int(local.rsplit(":", 1)[1], 16) == server_port and inode:
            out[int(remote.rsplit(":", 1)[1], 16)] = inode
    return out


def worker_of(server_port: int, client_port: int, workers: list[int]) -> int | None:
    """The worker process that accepted the connection from `client_port`, if any yet."""
    inode = _accepted_inodes(server_port).get(client_port)
    if inode is None:
        return None
    for pid in workers:
        if inode in socket_inodes(pid):
            return pid
    return None


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connections_per_worker(port: int, workers: list[int], per_worker: int
                                 ) -> dict[int, list[Conn]]:
    """`per_worker` keep-alive connections held by each worker; extra ones are closed."""
    held: dict[int, list[Conn]] = {pid: [] for pid in workers}
    deadline = time.monotonic() + FIND_TIMEOUT
    spare: list[Conn] = []
    try:
        while any(len(c) < per_worker for c in held.values()):
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"no connection reached every worker within {FIND_TIMEOUT:.0f} s: "
                    + ", ".join(f"{pid}: {len(c)}" for pid, c in held.items()))
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), FIND_TIMEOUT)
            client_port = writer.get_extra_info("sockname")[1]
            owner = None
            for _ in range(100):  # the worker accepts it a moment after connect returns
                owner = worker_of(port, client_port, workers)
                if owner is not None:
                    break
                await asyncio.sleep(0.01)
            if owner is not None and len(held[owner]) < per_worker:
                held[owner].append((reader, writer))
            else:
                spare.append((reader, writer))
    finally:
        for _, writer in spare:
            writer.close()
    return held


async def _pipelined(conn: Conn, requests: list[bytes], expect: bytes) -> None:
    """Send `requests` at once, read as many answers; each must have status `expect`."""
    reader, writer = conn
    writer.write(b"".join(requests))
    for _ in requests:
        status = (await reader.readline()).split(b" ")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        if len(status) < 2 or status[1] != expect:
            raise ServiceUnavailable(f"token warm-up: expected {expect.decode()}, got "
                                     f"{b' '.join(status).strip().decode()}: {body[:200]!r}")


async def warm(port: int, workers: list[int], tokens: TokenFile, pid: int) -> int:
    """Have every worker verify every token once; returns the requests sent."""
    held = await connections_per_worker(port, workers, CONNECTIONS_PER_WORKER)
    path = WARM_PATH.format(pid=pid).encode()
    requests = [b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer " + token
                + b"\r\n\r\n" for _, token in tokens.lines()]

    async def one(conn: Conn, share: list[bytes]) -> None:
        for i in range(0, len(share), PIPELINE):
            await asyncio.wait_for(_pipelined(conn, share[i:i + PIPELINE], b"403"), 30)

    try:
        await asyncio.gather(*(one(conn, requests[i::len(conns)])
                               for conns in held.values() for i, conn in enumerate(conns)))
    finally:
        for conns in held.values():
            for _, writer in conns:
                writer.close()
    return len(requests) * len(workers)
