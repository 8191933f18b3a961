"""The reader of a single Redis: every stream in one XREADGROUP call.

While its own pending entries are being re-read the call does not block (there is
something to read or the stream switches to `>`); after that it blocks up to
`block_ms`, so an idle worker sleeps and a new order wakes it at once.
"""

from __future__ import annotations

from redis.exceptions import ResponseError

from engine.keys import GROUP
from engine.pipeline.reader import StreamReader, ensure_group, is_nogroup


class RedisReader(StreamReader):
    async def _fetch(self, count: int, recovering: bool) -> list | None:
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, self.cursors, count=count,  # type: ignore[arg-type]
                block=None if recovering else self.block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            for stream in self.cursors:
                await ensure_group(self.redis, stream)
            return None
        return reply or []  # type: ignore[return-value]
