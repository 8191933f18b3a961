"""The one exponential backoff every retry loop uses.

A dependency that is down must slow the system, never spin it: each loop that retries
(a batch stage, the reader, a worker's boot, the status consumer, the Resource Domain,
the supervisor's respawns) waits `delay(attempt)` between tries. One formula with one
set of constants, so an operator tunes one setting (`retry_backoff_max`) and knows
what every loop does.
"""

from __future__ import annotations

import random

BASE = 0.05  # the first retry comes quickly: most outages are a blip
JITTER = 0.1  # +-10%: many workers that failed together do not retry in lockstep


def delay(attempt: int, cap: float, *, base: float = BASE) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first), at most `cap`."""
    raw = base * 2 ** min(max(attempt - 1, 0), 30)
    return min(cap, raw) * random.uniform(1 - JITTER, 1 + JITTER)
