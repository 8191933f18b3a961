"""The chaos runner: one live sale per fault, scored from the ground truth.

For each fault a sale of a product of its own is opened and sold through the real gate
(`engine.gate.redis_gate.Gate`, the Lua script the BFF runs), with `seckill run` (its
workers run the status loop) and `seckill resource-domain` running as child processes.
The fault is inflicted while the sale is live; once it is over the runner waits for the
stream to drain and every order to be provisioned, then reads what every place recorded
(the accepted replies, `seckill_logs`, a tap queue bound to the exchange, the Resource
Domain's table) and `engine.testing.invariants.score()` counts what the fault cost.

The runner owns a database, a vhost and a key prefix (`prepare()`), so it runs beside a
demo or a test run; the tests hand it theirs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine.config import Settings, to_env
from engine.errors import HarnessError, WaitTimedOut
from engine.gate.redis_gate import Gate
from engine.keys import DLQ_SUFFIX, GROUP, Keys
from engine.products import gpu_product, upsert_products
from engine.testing.faultproxy import ProxyProcess, upstream_of, via
from engine.testing.invariants import (
    Accepted,
    Answer,
    Event,
    Score,
    read_provisioned,
    read_rows,
    score,
)
from engine.testing.ports import free_port
from engine.testing.processes import SeckillProcess, engine_env
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import seconds_until, wait_for

from . import handoffs
from .bff import Bff

PROBE_USERS = 50  # users past the buyers, for a fault's own purchases through the BFF
BUY_CHUNK = 20  # purchases in flight at once
DRAIN_TIMEOUT = 180.0
SETTLE_TIMEOUT = 80.0  # every row in its final state, every instance provisioned, every
# returned unit handed on (a Resource Domain takes a dead one's claims over at once)
# Settings of every engine the runner starts: quick to notice and to recover, so a fault
# costs seconds, not minutes (the defaults are for production, not for a 20-minute suite).
# engine_env's QUICK timings, and these:
ENGINE_QUICK: dict[str, Any] = {"log_level": "INFO", "claim_idle_ms": 5000, "batch_size": 100,
                                "retry_backoff_max": 1}
RD_QUICK: dict[str, Any] = {"rd_delay_ms": 1, "log_json": False, "log_level": "INFO"}
# the proxied dependency's setting and default port
SERVICES = {"redis": ("redis_url", 6379), "rabbitmq": ("amqp_url", 5672),
            "postgresql": ("pg_dsn", 5432)}
TAP_PREFIX = "chaos-tap"  # a tap left by a run that was killed is found by its name


class ChaosError(HarnessError):
    """A fault could not be run (a process did not start, a condition never held)."""


@dataclass
class Fault:
    """One row of the scoreboard: what is done to the running sale, and how."""

    name: str
    inflict: Callable[[Sale], Awaitable[None]]
    stock: int = 1000
    engine: dict[str, Any] = field(default_factory=dict)  # engine setting overrides
    env: dict[str, str] = field(default_factory=dict)  # extra engine environment
    proxied: str | None = None  # a dependency reached through a fault proxy
    start_after: float = 0.2  # share of the stock sold before the fault begins
    sale_s: float = 4.0  # the buyers are paced to sell out in about this long, so a
    # fault that lasts a while meets orders arriving all through it
    known_loss: str | None = None  # what the design cannot survive, named on the board
    prepare: Callable[[Sale], Awaitable[None]] | None = None  # before the engine starts
    private: str | None = None  # a dependency swapped for a private node (PrivateNodes)
    dead_letters_expected: int = 0  # accepted orders the fault rightly dead-letters
    bff: bool = False  # the buyers buy over HTTP through `seckill bff` (JWT auth on)
    lane: str = "main"  # faults of another lane run beside this one's (bench.chaos)
    rd: dict[str, Any] = field(default_factory=dict)  # Resource Domain setting overrides
    waiting: int = 0  # users on the sale's waitlist from its start (issue 23)


@dataclass
class Sale:
    """One fault's live sale and the processes serving it."""

    settings: Settings
    fault: Fault
    redis: Redis
    product_id: int
    sale_id: str = ""
    accepted: list[Accepted] = field(default_factory=list)
    engines: list[SeckillProcess] = field(default_factory=list)
    resource_domain: SeckillProcess | None = None
    proxy: ProxyProcess | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # the proxied URL, if any
    notes: list[str] = field(default_factory=list)
    tap: EventTap | None = None  # bound to the exchange before the engine starts
    # held by a fault that restarts Redis: no purchase is in flight across the restart,
    # so every purchase has a reply and the accepted list is the whole truth
    buyers: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed_buys: int = 0
    node: Any = None  # the private node of the fault's dependency, if any
    done_buying: asyncio.Event = field(default_factory=asyncio.Event)
    bff: Bff | None = None  # the fault's BFF (Fault.bff)
    answers: list[Answer] = field(default_factory=list)  # the BFF's answers
    buyer_of: dict[str, int] = field(default_factory=dict)  # stream ID -> user (BFF)
    waiting: list[int] = field(default_factory=list)  # the waitlist, in turn
    released: int = 0  # releases asked by owners during the fault

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    @property
    def tap_queue(self) -> str:
        """The name of the sale's tap queue (a fault may unbind and bind it again)."""
        if self.tap is None:
            raise ChaosError("the sale's tap is not declared yet")
        return self.tap.queue

    @property
    def engine(self) -> SeckillProcess:
        return self.engines[-1]

    def start_engine(self, workers: int = 2) -> SeckillProcess:
        env = engine_env(self.settings,
                         **{**ENGINE_QUICK, **self.fault.engine, **self.overrides})
        env.update(self.fault.env)
        proc = SeckillProcess(["run", "--workers", str(workers)], env, "chaos-engine",
                              session=True)
        self.engines.append(proc)
        return proc

    def start_resource_domain(self) -> SeckillProcess:
        env = to_env(self.settings, **{**RD_QUICK, **self.fault.rd,
                                       "rd_metrics_port": free_port(), **self.overrides})
        self.resource_domain = SeckillProcess(["resource-domain"], env,
                                              "chaos-resource-domain", session=True)
        return self.resource_domain

    async def booted(self, workers: int = 2) -> None:
        engine = self.engine

        async def check() -> bool:
            if engine.proc.poll() is not None:
                raise ChaosError(f"the engine exited with {engine.proc.returncode}:\n"
                                 + engine.output()[-2000:])
            return await engine.booted(workers)

        await wait_for(check, 90, f"{workers} booted workers")

    def output(self) -> str:
        return "".join(p.output() for p in self.engines)

    def stop(self) -> None:
        for proc in [*self.engines, *([self.resource_domain] if self.resource_domain else [])]:
            proc.stop()
        if self.bff is not None:
            self.bff.stop()
        if self.proxy is not None:
            self.proxy.stop()

    # -- the buyers ------------------------------------------------------------------
    @property
    def users(self) -> range:
        """The buyers: the stock and 10% more, who find it sold out."""
        return range(1, self.fault.stock + self.fault.stock // 10 + 1)

    async def buy_all(self) -> None:
        """Every buyer tries once, a chunk at a time, until the stock is gone (and 10%
        more find it sold out): through the gate's client, or over HTTP via the BFF."""
        try:
            if self.bff is not None:
                await self._buy_over_http(self.bff)
            else:
                await self._buy_through_gate()
        finally:
            self.done_buying.set()

    async def _buy_through_gate(self) -> None:
        gate = Gate(self.redis, self.keys)
        pause = self.fault.sale_s / (len(self.users) / BUY_CHUNK)
        for start in range(0, len(self.users), BUY_CHUNK):
            chunk = self.users[start:start + BUY_CHUNK]
            async with self.buyers:
                if gate.redis is not self.redis:  # reconnected after a restart
                    gate = Gate(self.redis, self.keys)
                results = await asyncio.gather(*(gate.buy(self.product_id, u) for u in chunk),
                                               return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    self.failed_buys += 1  # no reply: the gate refused (Redis down)
                elif r.outcome == "accepted" and r.stream_id:
                    self.accepted.append(Accepted(self.product_id, r.stream_id,
                                                  self.sale_id, r.slot))
            await asyncio.sleep(pause)

    async def _buy_over_http(self, bff: Bff) -> None:
        pause = self.fault.sale_s / (len(self.users) / BUY_CHUNK)
        async with bff.client() as client:
            for start in range(0, len(self.users), BUY_CHUNK):
                chunk = self.users[start:start + BUY_CHUNK]
                async with self.buyers:
                    replies = await asyncio.gather(*(bff.buy(client, self.product_id, u)
                                                     for u in chunk))
                for user, (status, body) in zip(chunk, replies, strict=True):
                    self.answers.append(Answer("buyer", "buy", status))
                    if status == 202:
                        self.accepted.append(Accepted(self.product_id, body["stream_id"],
                                                      self.sale_id, body["slot"]))
                        self.buyer_of[body["stream_id"]] = user
                    elif status is None or status >= 500:
                        self.failed_buys += 1
                await asyncio.sleep(pause)

    async def reconnect_redis(self) -> None:
        """A new client after Redis restarted (the old one's connections are dead)."""
        old, self.redis = self.redis, Redis.from_url(self.settings.redis_url)
        await old.aclose()

    async def sold_at_least(self, share: float) -> bool:
        return len(self.accepted) >= share * self.fault.stock

    # -- the ground truth ------------------------------------------------------------
    async def drained(self) -> bool:
        """Every accepted order has its row and the group holds nothing pending or unread."""
        stream = self.keys.stream(self.product_id)
        if not await self.redis.exists(stream):  # Redis lost it: nothing left to drain
            return True
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if _text(g["name"]) == GROUP), None)
        if group is None or group["pending"] or group.get("lag") not in (0, None):
            return False
        if group.get("lag") == 0 and await self.redis.xlen(stream) < len(self.accepted):
            return True  # the stream lost entries (Redis without persistence): they are
            # gone, not late; what is left was read and acknowledged after its row
        letters = await self.dead_letters()  # an accepted order dead-lettered has no row
        return await self._rows() >= sum(a.stream_id not in letters for a in self.accepted)

    async def _rows(self) -> int:
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM seckill_logs"
                                           " WHERE product_id = $1", self.product_id))
        finally:
            await conn.close()

    async def settled(self) -> bool:
        """Every row in its final state (RUNNING, FAILED, RELEASED: provisioned or deleted
        and reported back through the loop), every returned unit handed on, every release
        request read."""
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            left = await conn.fetchval(
                "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND (status IN "
                "('PROCESSING', 'RELEASING') OR (status IN ('FAILED', 'RELEASED') AND "
                "compensated_at IS NULL))", self.product_id)
        finally:
            await conn.close()
        return left == 0 and await handoffs.release_stream_settled(self)

    async def dead_letters(self) -> set[str]:
        """Stream IDs of the sale's entries that went to the dead-letter stream."""
        letters = await self.redis.xrange(self.keys.stream(self.product_id) + DLQ_SUFFIX)
        return {_text(f.get(b"id", b"")) for _, f in letters}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- one fault ----------------------------------------------------------------------
@dataclass
class Result:
    """One row of the scoreboard."""

    fault: str
    score: Score
    verdict: str
    seconds: float
    notes: list[str]
    final_s: float | None = None  # from the fault's end to the last order in its final state

    def as_dict(self) -> dict[str, Any]:
        s = self.score
        return {"fault": self.fault, "accepted": s.accepted, "lost": s.lost,
                "duplicated": s.duplicated, "oversold": s.oversold,
                "unexpected": s.unexpected, "bff_5xx": s.server_errors,
                "recovery_s": s.recovery_s,
                "final_s": None if self.final_s is None else round(self.final_s, 1),
                "verdict": self.verdict, "provisioned_twice": s.provisioned_twice,
                "examples": s.examples, "seconds": round(self.seconds, 1),
                "notes": self.notes}


class PrivateNodes:
    """Servers of the run's own (engine.testing.nodes) for the faults that stop,
    restart or alarm a service: the shared ones are never touched. Each is started the
    first time a fault asks for it and reused by the next; `destroy()` at the end."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}

    def node(self, kind: str) -> Any:
        if kind not in self.nodes:
            self.nodes[kind] = self._start(kind)
        node = self.nodes[kind]
        node.start()  # running and answering again, whatever the last fault did
        return node

    @staticmethod
    def _start(kind: str) -> Any:
        from engine.admin.migrate import apply_migrations
        from engine.testing.nodes import PostgresNode, RabbitNode, RedisNode

        if kind == "redis-aof":
            return RedisNode(appendonly=True, extra=("--appendfsync", "always")).start()
        if kind == "redis":
            return RedisNode().start()
        if kind == "rabbitmq":
            return RabbitNode().start()
        if kind == "postgresql":
            node = PostgresNode(database="seckill_chaos").start()
            apply_migrations(node.url)
            return node
        raise ValueError(f"no private node of kind {kind!r}")

    def settings_for(self, kind: str, settings: Settings) -> Settings:
        node = self.node(kind)
        if kind == "rabbitmq":
            from engine.admin.brokerusers import ensure_broker_users
            from engine.admin.migrate import declare_topology
            from engine.testing.nodes import rabbit_bin

            asyncio.run(declare_topology(node.url))
            settings = settings.replace(amqp_url=node.url)
            ensure_broker_users(settings, env=node.env(),
                                command=[str(rabbit_bin() / "rabbitmqctl"), "-n", node.nodename])
            return settings
        if kind == "postgresql":
            return settings.replace(pg_dsn=node.url)
        return settings.replace(redis_url=node.url)

    def destroy(self) -> None:
        for node in self.nodes.values():
            node.destroy()
        self.nodes.clear()


async def run_fault(settings: Settings, fault: Fault, say: Callable[[str], None],
                    nodes: PrivateNodes | None = None) -> Result:
    """Open a sale, start the engine and the Resource Domain, sell, inflict the fault,
    wait for the recovery, and score what it cost."""
    started = time.monotonic()
    product_id = int.from_bytes(os.urandom(4), "big") % (8 * 10**9) + 10**9
    if fault.private:
        if nodes is None:
            raise ChaosError(f"{fault.name} needs a private {fault.private} node")
        say(f"  {fault.name}: on a private {fault.private} node")
        settings = await asyncio.to_thread(nodes.settings_for, fault.private, settings)
    sale = Sale(settings, fault, Redis.from_url(settings.redis_url), product_id)
    if nodes and fault.private:  # blocking: the other lane's sale goes on meanwhile
        sale.node = await asyncio.to_thread(nodes.node, fault.private)
    try:
        return await _run(sale, say, started)
    finally:
        await asyncio.to_thread(sale.stop)
        await sale.redis.aclose()
        if sale.tap is not None:
            await sale.tap.delete()


async def _run(sale: Sale, say: Callable[[str], None], started: float) -> Result:
    settings, fault = sale.settings, sale.fault
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        await upsert_products(conn, [gpu_product(sale.product_id)])
    finally:
        await conn.close()
    sale.sale_id = await Gate(sale.redis, sale.keys).open_sale(sale.product_id, fault.stock)
    sale.tap = await EventTap(settings.amqp_url, prefix=TAP_PREFIX).declare()
    if fault.proxied:
        setting, port = SERVICES[fault.proxied]
        url = getattr(settings, setting)
        sale.proxy = await asyncio.to_thread(ProxyProcess, upstream_of(url, port))
        sale.overrides[setting] = via(url, sale.proxy.port)
    if fault.prepare is not None:
        await fault.prepare(sale)
    sale.start_resource_domain()
    sale.start_engine()
    if fault.bff:
        sale.bff = await Bff.start(settings, range(1, sale.users.stop + PROBE_USERS),
                                   sale.overrides)
    await sale.booted()
    if fault.waiting:
        first = sale.users.stop + PROBE_USERS
        await handoffs.join_waitlist(sale, list(range(first, first + fault.waiting)))
    buying = asyncio.create_task(sale.buy_all())
    try:
        await wait_for(lambda: _sold_or_done(sale, buying), 120, "the sale under way")
        say(f"  {fault.name}: inflicting at {len(sale.accepted)} accepted")
        await fault.inflict(sale)
        fault_end = time.monotonic()
        say(f"  {fault.name}: fault over, {len(sale.accepted)} accepted; recovering")
        await buying
    finally:
        if not buying.done():
            buying.cancel()
    recovery = await seconds_until(fault_end, sale.drained, DRAIN_TIMEOUT)
    if recovery is None:
        sale.notes.append(f"the stream did not drain within {DRAIN_TIMEOUT:.0f}s")
    drained_at = time.monotonic()
    final = None
    try:
        await wait_for(sale.settled, SETTLE_TIMEOUT, "every row in its final state")
    except WaitTimedOut as exc:
        sale.notes.append(str(exc))
    else:
        final = time.monotonic() - fault_end
        settled = time.monotonic() - drained_at
        if settled > 5:
            sale.notes.append(f"every instance provisioned and its status recorded {settled:.0f} s"
                              " after the stream drained")
    result = await _score(sale, recovery, started)
    result.final_s = final
    return result


async def _sold_or_done(sale: Sale, buying: asyncio.Task[None]) -> bool:
    if buying.done():
        buying.result()  # raises what the buyers raised
        return True
    return await sale.sold_at_least(sale.fault.start_after)


async def _score(sale: Sale, recovery: float | None, started: float) -> Result:
    settings = sale.settings
    letters = await sale.dead_letters()
    accepted = list(sale.accepted)
    lettered = [a for a in accepted if a.stream_id in letters]
    if lettered and sale.fault.dead_letters_expected:
        # the fault's own victims: in the dead-letter stream with the reason, not lost
        accepted = [a for a in accepted if a.stream_id not in letters]
        sale.notes.append(f"{len(lettered)} accepted order(s) dead-lettered as intended"
                          f" (expected {sale.fault.dead_letters_expected})")
    elif lettered:  # dead-lettered by a fault that should not: counted lost
        sale.notes.append(f"{len(lettered)} accepted orders dead-lettered")
    stock = sale.fault.stock
    returns = await handoffs.read(sale)
    if returns.returned or sale.waiting:  # returned units may be sold once more
        accepted, stock = handoffs.accounted(accepted, returns, stock)
        sale.notes.append(f"{returns.returned} unit(s) returned, {len(returns.handed)} "
                          f"handed to waiting users, {returns.stock_left} left in stock")
        sale.notes += returns.problems
    assert sale.tap is not None
    events = [Event.of(e) for e in await collect_orders(sale.tap, len(accepted), 60)]
    await sale.tap.delete()
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        rows = await read_rows(conn, [sale.product_id])
        provisioned = await read_provisioned(conn, [r.instance_id for r in rows])
    finally:
        await conn.close()
    bff = sale.bff
    entries = None
    if bff is not None:  # every entry a buyer's: none written for a hostile request
        found = await sale.redis.xrange(sale.keys.stream(sale.product_id))
        entries = [(sale.product_id, _text(entry_id)) for entry_id, _ in found or []]
        if not bff.alive():
            sale.notes.append(f"the BFF exited with {bff.server.process.proc.returncode}")
            sale.answers.append(Answer("probe", "the BFF still running", None))
    result = score(accepted, rows, events, {sale.product_id: stock}, provisioned,
                   recovery, entries=entries, answers=sale.answers if bff else None)
    result.accepted = len(sale.accepted)
    unprovisioned = sum(1 for r in rows if r.instance_id not in provisioned)
    if unprovisioned:
        sale.notes.append(f"{unprovisioned} logged instances never provisioned")
    if sale.failed_buys:
        sale.notes.append(f"{sale.failed_buys} purchases refused with an error (service down)")
    respawns = sale.output().count("respawning in")
    if respawns:
        sale.notes.append(f"{respawns} worker respawns")
    if "halting: " in sale.output():
        sale.notes.append("the supervisor halted")
    verdict = result.verdict(sale.fault.known_loss)
    wrong_letters = (sale.fault.dead_letters_expected
                     and len(lettered) != sale.fault.dead_letters_expected)
    if verdict == "pass" and (recovery is None or unprovisioned or wrong_letters
                              or returns.problems):
        verdict = "fail"
    return Result(sale.fault.name, result, verdict, time.monotonic() - started, sale.notes)
