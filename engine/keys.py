"""Every Redis key, stream and consumer-group name.

Other teams and operators rely on these names (SPEC.md), so they live in one
place (the message bus's names are `engine.amqp.topology`'s). All keys of one
product share the hash tag `{<pid>}` so the gate script touches a single Redis
Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "product-service"
DLQ_SUFFIX = ":dlq"


@dataclass(frozen=True, slots=True)
class Keys:
    """Redis key names under an optional prefix (tests and tenants get their own)."""

    prefix: str = ""

    def stock(self, pid: int) -> str:
        return f"{self.prefix}seckill:{{{pid}}}:stock"

    def sale(self, pid: int) -> str:
        return f"{self.prefix}seckill:{{{pid}}}:sale"

    def buyers(self, pid: int) -> str:
        return f"{self.prefix}seckill:{{{pid}}}:buyers"

    def free_slots(self, pid: int) -> str:
        """Slots handed back by compensation, reused before new ones."""
        return f"{self.prefix}seckill:{{{pid}}}:free-slots"

    def window(self, pid: int) -> str:
        """The open sale's schedule and limits: a hash of start and end (unix ms), and
        user_rate, user_burst, ip_rate, ip_burst when the sale overrides the settings."""
        return f"{self.prefix}seckill:{{{pid}}}:window"

    def gate_state(self, pid: int) -> str:
        """The open sale as the purchase script reads it with the stock, in one MGET: its
        sale ID (then its own limits, tab-separated, if it has any), written once the
        sale is open and expiring at its end; the window hash stays the reference."""
        return f"{self.prefix}seckill:{{{pid}}}:gate"

    def user_limiter(self, pid: int, uid: int) -> str:
        """A user's rate limiter for this product (GCRA arrival time, expires by itself)."""
        return f"{self.prefix}seckill:{{{pid}}}:rate:user:{uid}"

    def ip_limiter(self, pid: int, ip: str) -> str:
        """A client address's rate limiter for this product."""
        return f"{self.prefix}seckill:{{{pid}}}:rate:ip:{ip}"

    def refunded(self, pid: int) -> str:
        """Stream IDs whose unit of stock was already returned (exactly once)."""
        return f"{self.prefix}seckill:{{{pid}}}:refunded"

    def waitlist(self, pid: int) -> str:
        """Users waiting for a returned unit of the open sale: a sorted set of user IDs
        scored by their turn (`waitlist_seq`), so a position is one ZRANK."""
        return f"{self.prefix}seckill:{{{pid}}}:waitlist"

    def waitlist_seq(self, pid: int) -> str:
        """The last turn handed to a joining user (INCR): first come, first served."""
        return f"{self.prefix}seckill:{{{pid}}}:waitlist-seq"

    def waitlist_stats(self, pid: int) -> str:
        """Hash of the open sale's waitlist figures: `handed` (units given to waiting
        users), `released` (instances given back by their owners)."""
        return f"{self.prefix}seckill:{{{pid}}}:waitlist-stats"

    def releases(self, pid: int) -> str:
        """Release requests of this product's RUNNING orders (DELETE .../order, `seckill
        order release`), read by the engine, which asks the Resource Domain to delete."""
        return f"{self.prefix}stream:seckill:{{{pid}}}:releases"

    def release_dlq(self, pid: int) -> str:
        """Release requests the engine refused (malformed, not the order's owner, not
        RUNNING), each with its reason."""
        return f"{self.prefix}stream:seckill:{{{pid}}}:releases{DLQ_SUFFIX}"

    def release_requested(self, pid: int) -> str:
        """Stream IDs of the orders whose release was already requested: a repeated
        DELETE adds no second entry to `releases` (exactly once per order)."""
        return f"{self.prefix}seckill:{{{pid}}}:release-requested"

    def waitlist_ended(self, pid: int) -> str:
        """Users who were still waiting when the sale closed (or a new one opened): a
        sorted set like `waitlist`, kept a while so that they read ENDED, not 404."""
        return f"{self.prefix}seckill:{{{pid}}}:waitlist-ended"

    def errors(self, pid: int) -> str:
        """Last error per stream entry whose batch failed (read when it is dead-lettered)."""
        return f"{self.prefix}seckill:{{{pid}}}:errors"

    def stream(self, pid: int) -> str:
        return f"{self.prefix}stream:seckill:{{{pid}}}"

    def dlq(self, pid: int) -> str:
        return f"{self.prefix}stream:seckill:{{{pid}}}{DLQ_SUFFIX}"

    def node(self, node_id: int) -> str:
        """A snowflake node-ID lease. Every lease shares the hash tag `{node}`, so the
        script that tries them all runs on one Redis Cluster slot."""
        return f"{self.prefix}seckill:{{node}}:{node_id}"

    @property
    def status_dlq(self) -> str:
        """Status reports that could not be applied (unknown instance, bad body)."""
        return f"{self.prefix}stream:seckill:status:dlq"

    @property
    def release_signals(self) -> str:
        """One entry (`pid`) per release request recorded, of any product, after the
        request itself: a worker reads the release streams only of the products named
        here since it last looked (and all of them, slowly, in case a signal was lost).
        Not in the request's script: on a Redis Cluster this key is in another slot."""
        return f"{self.prefix}stream:seckill:release-signals"

    @property
    def gauge_exporter(self) -> str:
        """The engine_id whose supervisor exports the cluster-wide per-sale gauges."""
        return f"{self.prefix}seckill:gauge-exporter"

    @property
    def state_marker(self) -> str:
        """Written by the workers at boot; gone only if Redis lost every key
        (engine.pipeline.statewatch)."""
        return f"{self.prefix}seckill:state-marker"

    @property
    def streams(self) -> str:
        """Set of product IDs whose order stream the engine reads."""
        return f"{self.prefix}seckill:streams"

    @property
    def stream_pattern(self) -> str:
        """SCAN pattern of order streams, to find ones added by hand."""
        return f"{self.prefix}stream:seckill:{{*}}"

    def product_of_stream(self, stream: str) -> int | None:
        """The product ID of an order-stream key, or None for any other key."""
        head = f"{self.prefix}stream:seckill:{{"
        if not (stream.startswith(head) and stream.endswith("}")):
            return None
        digits = stream[len(head):-1]
        return int(digits) if digits.isdigit() else None
