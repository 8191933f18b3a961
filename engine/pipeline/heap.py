"""The worker's garbage collector, set for a process that makes and drops a batch's
objects thousands of times a second and holds next to nothing across batches.

A batch of 1,000 orders makes tens of thousands of objects (entries, orders, field
dicts, event bodies), none of them in a reference cycle, all freed by reference
counting when the batch is acknowledged. With the interpreter's defaults they set
off a young collection every 700 of them, and every hundredth of those is a full
collection that walks every object the worker booted with (modules, the connections,
the metrics), for nothing: the profile of a worker (docs/performance.md) put about a
tenth of its CPU in the collector. So the booted heap is frozen out of the
collector's walks (`gc.freeze`), and the older generations are collected less often.
The young generation stays small: cyclic garbage (asyncio's futures and their
callbacks, an exception with its traceback) waits for it, and a larger one let a
worker's peak RSS with 1,000 open sales grow past the 80 MB bound.
"""

from __future__ import annotations

import gc

YOUNG = 2_000  # container objects allocated (net) between two young collections
OLDER = (10, 20)  # young collections per middle one, middle per full one


def settle_heap() -> None:
    """Call once the worker has booted: what exists now lives as long as the worker."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, *OLDER)
