"""The reader of a single Redis: every stream in one XREADGROUP call.

While its own pending entries are being re-read the call does not block (there is
something to read or the stream switches to `>`); after that it blocks up to
`block_ms`, so an idle worker sleeps and a new order wakes it at once.

The call goes through a second client on the same connection pool whose XREADGROUP
reply is taken as the parser returns it: redis-py's own callback builds a tuple and
a dict per entry that `StreamReader._collect` would only take apart again (a
twentieth of a worker's CPU in the profile of issue 24).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.keys import GROUP
from engine.pipeline.reader import StreamReader, ensure_group, is_nogroup


def _as_is(response: Any, **kwargs: Any) -> Any:
    return response


class RedisReader(StreamReader):
    flat_fields = True

    def __init__(self, redis: Redis, *args: Any) -> None:
        super().__init__(redis, *args)
        self._raw = Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _as_is)

    async def _fetch(self, count: int, recovering: bool) -> list | None:
        try:
            reply = await self._raw.xreadgroup(
                GROUP, self.consumer, self.cursors, count=count,  # type: ignore[arg-type]
                block=None if recovering else self.block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            for stream in self.cursors:
                await ensure_group(self.redis, stream)
            return None
        if not reply:
            return []
        # RESP3 answers with a map of stream -> entries, RESP2 with [stream, entries] pairs
        return list(reply.items()) if isinstance(reply, dict) else reply  # type: ignore[no-any-return]
