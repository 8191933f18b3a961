"""Names on the message bus: the exchange, its queues and routing keys (SPEC.md).

Other teams bind to these, so they live in one place; `seckill migrate` declares them.
"""

from __future__ import annotations

EXCHANGE = "resource.events"
EXCHANGE_TYPE = "topic"
RK_CREATED = "instance.created"
RK_STATUS = "instance.status"
RK_RELEASED = "instance.released"  # the engine asks the Resource Domain to delete one
QUEUE_CREATED = "resource.instance-created"  # the Resource Domain's inbox
QUEUE_RELEASED = "resource.instance-released"  # the Resource Domain's release inbox
QUEUE_STATUS = "product-service.instance-status"  # the engine's status consumer
CONTENT_TYPE = "application/x-protobuf"
