"""Tokens verified by any of the BFF's worker processes: one table they all share.

Each Granian worker keeps its own cache of verified tokens (engine.gate.auth), so
a buyer whose token worker A verified when the sale page loaded was new again when
the purchase landed on worker B: at the start of a sale every worker paid a
signature check for nearly every buyer. This table, in shared memory, lets a
signature checked once by any worker stand for all of them.

The table is created by the BFF's supervising process before its workers start,
in a fresh directory of its own under /dev/shm (mode 0700, the file 0600, opened
with O_EXCL), and removed when the BFF stops; workers find it by the path in
`TABLE_ENV`, so it works whether Granian forks its workers (Python 3.11-3.13 on
Linux) or spawns them (3.14's default, forkserver, which Granian replaces with
spawn): a spawned worker inherits the environment, not the mapping.

Why an identity read from here is safe:

- only the BFF's own processes can write it: the file is private to the BFF's
  user, made fresh at each start (never reused from a previous run);
- a slot is keyed by a 128-bit BLAKE2b hash of the whole token, not by a user
  ID, so a hit means the very bytes presented were verified; finding another
  token with that hash is a second preimage, not a birthday collision;
- each slot carries a MAC (keyed BLAKE2b) over its key, user ID and expiry, with a
  key drawn at start and passed only to the workers (`KEY_ENV`): a slot two
  workers wrote at once, or one read half-written (there is no lock), fails its
  MAC and reads as a miss, and so does anything written by a process that does
  not hold the key: the worst a bad slot does is cost one signature check;
- an entry is good only until its token's `exp`: an expired one is a miss, and the
  token then goes through the full verification, which refuses it;
- it holds no token, only hashes of tokens: reading it gives nobody a credential.

Open addressing over a power-of-two number of slots (twice `bff_token_cache`), a
token looked for in `PROBES` neighbouring slots: a lookup and an insert cost the
same whatever the table holds. A full neighbourhood loses the entry that expires
first, which only means one more signature check later.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterator

TABLE_ENV = "SECKILL_BFF_TOKEN_TABLE"
KEY_ENV = "SECKILL_BFF_TOKEN_TABLE_KEY"
# token digest (16 bytes), user ID, exp (a float, seconds), MAC of the three (16 bytes)
SLOT = struct.Struct("<16sQd16s")
SIGNED = 32  # the bytes the MAC covers: digest, user ID, exp
PROBES = 4
SHM = "/dev/shm"


class VerifiedTokens:
    """Token digest -> (user ID, exp), in a mapping shared by the BFF's processes."""

    def __init__(self, memory: mmap.mmap, key: bytes) -> None:
        self.memory = memory
        self.mask = len(memory) // SLOT.size - 1
        self._mac = hashlib.blake2b(key=key, digest_size=16)

    @staticmethod
    def slots_for(capacity: int) -> int:
        """The table's slots for `capacity` tokens: a power of two, at least twice it."""
        return 1 << max(4, (2 * capacity - 1).bit_length())

    @classmethod
    def attach(cls) -> VerifiedTokens | None:
        """The table the BFF's supervisor made for this worker, or None (no shared
        table: a single process, or verification with no cache)."""
        path, key = os.environ.get(TABLE_ENV), os.environ.get(KEY_ENV)
        if not path or not key:
            return None
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if (info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077
                    or not stat.S_ISREG(info.st_mode)):
                raise PermissionError(f"{path}: the token table must be the BFF's own, "
                                      "mode 0600")
            memory = mmap.mmap(fd, info.st_size)
        finally:
            os.close(fd)
        return cls(memory, bytes.fromhex(key))

    def get(self, digest: bytes) -> tuple[int, float] | None:
        """(user ID, exp) of a token verified by any worker and not yet expired."""
        memory, size = self.memory, SLOT.size
        home = int.from_bytes(digest[:8], "little")
        for probe in range(PROBES):
            offset = ((home + probe) & self.mask) * size
            if memory[offset:offset + 16] != digest:
                continue
            raw = memory[offset:offset + size]
            _, user_id, exp, mac = SLOT.unpack(raw)
            if mac != self._sign(raw[:SIGNED]) or exp <= time.time():
                return None  # torn, foreign or expired: verify the token again
            return user_id, exp
        return None

    def put(self, digest: bytes, user_id: int, exp: float) -> None:
        """Remember a verified token: in its own slot, else a free, expired or invalid
        one of its neighbourhood, else the one that expires first."""
        memory, size, now = self.memory, SLOT.size, time.time()
        home = int.from_bytes(digest[:8], "little")
        target, soonest = -1, float("inf")
        for probe in range(PROBES):
            offset = ((home + probe) & self.mask) * size
            raw = memory[offset:offset + size]
            other, _, other_exp, mac = SLOT.unpack(raw)
            if other == digest or other_exp <= now or mac != self._sign(raw[:SIGNED]):
                target = offset
                break
            if other_exp < soonest:
                target, soonest = offset, other_exp
        signed = SLOT.pack(digest, user_id, exp, b"")[:SIGNED]
        memory[target:target + size] = signed + self._sign(signed)

    def _sign(self, signed: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(signed)
        return mac.digest()

    def close(self) -> None:
        self.memory.close()


@contextlib.contextmanager
def shared_table(capacity: int) -> Iterator[str | None]:
    """In the BFF's supervisor, around serving: a new table for `capacity` tokens
    that the workers it starts attach to; removed on the way out. Yields its path
    (None when `capacity` is 0: no cache, nothing to share)."""
    if capacity <= 0:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="seckill-bff-tokens-",
                                 dir=SHM if os.path.isdir(SHM) else None)
    path = os.path.join(directory, "verified-tokens")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, VerifiedTokens.slots_for(capacity) * SLOT.size)
        finally:
            os.close(fd)
        os.environ[TABLE_ENV], os.environ[KEY_ENV] = path, secrets.token_hex(32)
        yield path
    finally:
        os.environ.pop(TABLE_ENV, None)
        os.environ.pop(KEY_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
