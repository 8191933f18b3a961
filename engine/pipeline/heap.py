"""The worker's garbage collector, kept off the heap the worker booted with.

A batch of 1,000 orders makes tens of thousands of objects (entries, orders, field
dicts, event bodies), none of them in a reference cycle, all freed by reference
counting when the batch is acknowledged; but they set off the collector, and every
hundredth young collection is a full one that walked every object the worker booted
with (modules, the connections, the metrics), for nothing: a native profile of a
worker (docs/performance.md) put about a tenth of its CPU in the collector. So the
booted heap is frozen out of the collector's walks (`gc.freeze`). The thresholds stay
the interpreter's: collecting less often let cyclic garbage (asyncio's futures and
callbacks) pile up, and a worker with 1,000 open sales past its 80 MB bound.
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Call once the worker has booted: what exists now lives as long as the worker."""
    gc.collect()
    gc.freeze()
