"""The states of an order row in `seckill_logs`, as the BFF shows them.

An order is PROCESSING until the Resource Domain reports; RUNNING and FAILED are
final: a report never moves an order out of them.
"""

from __future__ import annotations

PROCESSING = "PROCESSING"
RUNNING = "RUNNING"
FAILED = "FAILED"
FINAL = frozenset({RUNNING, FAILED})
