"""The states of an order row in `seckill_logs`, as the BFF shows them.

An order is PROCESSING until the Resource Domain reports; FAILED is final, and a
report never moves an order back. A RUNNING order its owner gives back becomes
RELEASING (the engine has asked the Resource Domain to delete it), then RELEASED
(deleted; its unit went to the waitlist's head or back to stock). WAITLISTED and
ENDED are never rows: a user waiting for a returned unit, and one whose sale ended
while they waited.
"""

from __future__ import annotations

PROCESSING = "PROCESSING"
RUNNING = "RUNNING"
FAILED = "FAILED"
RELEASING = "RELEASING"
RELEASED = "RELEASED"
WAITLISTED = "WAITLISTED"
ENDED = "ENDED"
FINAL = frozenset({FAILED, RELEASED})  # no report moves a row out of these
LIVE = frozenset({PROCESSING, RUNNING, RELEASING})  # the order holds a unit of stock
