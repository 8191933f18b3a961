"""The faults of the chaos suite, cheapest and most valuable first.

Each `Fault` inflicts itself on a live sale (`runner.Sale`) and returns when the fault
is over (the service is back, the killed process restarted): the recovery time is
counted from then. Outages last as long as the issue says (`OUTAGE_S`, `PG_DOWN_S`);
the longest ones, which keep their engine waiting more than working, run in the
`BESIDE` lane next to the others (runner.Fault.lane) so the suite fits in 20 minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import aiormq
import asyncpg
import httpx

from engine.amqp.topology import EXCHANGE, QUEUE_CREATED, RK_CREATED
from engine.config import to_env
from engine.keys import GROUP
from engine.pipeline.faults import MID_DEAD_LETTER, POINTS
from engine.testing.invariants import Answer
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, pid_alive
from engine.testing.waits import wait_for

from . import handoffs
from .hostile import forged_failures, forged_orders
from .runner import Fault, Sale

OUTAGE_S = 30.0  # RabbitMQ stopped, a memory alarm, a blackhole, +latency, a slow link
TOPOLOGY_S = 10.0  # a binding or the queue gone (the issue gives no length)
PG_DOWN_S = 300.0  # PostgreSQL down 5 minutes
SHORT_SALE_S = 20.0  # the sale of a fault that is over in seconds but needs orders around it
BESIDE = "beside"  # the lane of the long outages (see the module's docstring)
LATENCY_S = 0.2  # added each way
SLOW_LINK = 20_000  # bytes a second each way
POISON = 20  # dead letters written around the mid-dead-letter kill
# the engine notices a lost connection well within an outage (as tests/chaos does)
NETWORK_QUICK: dict[str, Any] = {"publish_timeout": 2, "db_timeout": 2, "redis_timeout": 1,
                                 "connect_timeout": 2, "retry_backoff_max": 1}


# -- processes ----------------------------------------------------------------------
def batch_point(point: str) -> Fault:
    """SIGKILL a worker at one point of a batch (SECKILL_FAULT_POINT); it is respawned."""

    async def inflict(sale: Sale) -> None:
        if point == MID_DEAD_LETTER:  # the point is only reached by a dead-letter write
            stream = sale.keys.stream(sale.product_id)
            for _ in range(POISON):
                await sale.redis.xadd(stream, {"uid": "not-a-user", "ts": "1"})
        engine = sale.engine

        async def killed() -> bool:
            out = engine.output()
            return f"fault point {point}: SIGKILL" in out and "exited with -9" in out

        await wait_for(killed, 60, f"a worker killed {point}")
        await wait_for(lambda: _workers(sale, 2), 60, "the killed worker respawned")

    return Fault(f"SIGKILL {point}", inflict, start_after=0.0,
                 env={"SECKILL_FAULT_POINT": point,
                      "SECKILL_FAULT_DIR": tempfile.mkdtemp(prefix="seckill-chaos-points-")})


async def _workers(sale: Sale, n: int) -> bool:
    return len(sale.engine.children()) == n


async def _kill_supervisor(sale: Sale) -> None:
    """SIGKILL the supervisor alone; its workers notice (parent changed) and exit; a new
    supervisor is started once they are gone."""
    orphans = sale.engine.children()
    sale.engine.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(sale.engine.proc.wait, 10)

    async def gone() -> bool:
        return not any(pid_alive(pid) for pid in orphans)

    await wait_for(gone, 60, "the orphaned workers to exit")
    sale.start_engine()
    await sale.booted()


async def _kill_host(sale: Sale) -> None:
    """SIGKILL every process of the engine and the Resource Domain at once, restart both."""
    assert sale.resource_domain is not None
    for proc in (sale.engine, sale.resource_domain):
        await asyncio.to_thread(proc.kill_all)
    sale.start_resource_domain()
    sale.start_engine()
    await sale.booted()


STOPPED_CLAIM_IDLE_MS = 3000


async def _stop_worker(sale: Sale) -> None:
    """SIGSTOP a worker while it holds entries, for twice claim_idle_ms (the other
    worker's janitor reclaims them), then SIGCONT: its late work must not log or
    provision twice."""
    consumers = _consumers(sale.engine.output())
    stream = sale.keys.stream(sale.product_id)
    for _ in range(100):  # until it is caught holding a batch
        worker = sale.engine.children()[0]
        os.kill(worker, signal.SIGSTOP)
        held = await _held(sale, stream, consumers.get(worker, ""))
        if held:
            break
        os.kill(worker, signal.SIGCONT)
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("no worker was caught holding entries")
    try:
        await asyncio.sleep(2 * STOPPED_CLAIM_IDLE_MS / 1000 + 2)
        still = await _held(sale, stream, consumers[worker])
    finally:
        os.kill(worker, signal.SIGCONT)
    sale.notes.append(f"the stopped worker held {held} entries; {held - still} were"
                      " reclaimed by the other before it was continued")
    await asyncio.sleep(2)  # its late batch runs into what the other did meanwhile


def _consumers(output: str) -> dict[int, str]:
    """Worker PID -> its consumer name, from the workers' boot lines."""
    found = re.findall(r"seckill\.worker\[(\d+)\] worker \d+ booted as ([^,\s]+)", output)
    return {int(pid): name for pid, name in found}


async def _held(sale: Sale, stream: str, consumer: str) -> int:
    """Entries of `stream` pending on `consumer`."""
    info = await sale.redis.xpending(stream, GROUP)
    for entry in info.get("consumers") or []:
        name = entry["name"].decode() if isinstance(entry["name"], bytes) else entry["name"]
        if name == consumer:
            return int(entry["pending"])
    return 0


# -- bad input ----------------------------------------------------------------------
def _hostile_entries(max_entry_bytes: int) -> list[dict[str, str | bytes]]:
    """Stream entries the gate never writes: each must be dead-lettered, none logged."""
    return [
        {"uid": "not-a-user", "ts": "1"},
        {"uid": "-5", "ts": "1"},
        {"uid": "0", "ts": "1"},
        {"uid": str(2**70), "ts": "1"},
        {"uid": "", "ts": "1"},
        {"ts": "1"},
        {"uid": b"\xff\xfe\x00", "ts": "1"},
        {"uid": "1e3", "ts": "1"},
        {"uid": "12; DROP TABLE seckill_logs", "ts": "1"},
        {"uid": "42", "ts": "1", "pad": "x" * (max_entry_bytes + 1)},
    ]


async def _bad_input(sale: Sale) -> None:
    """Malformed and oversized entries at full rate into the sale's stream, pipelined,
    while the buyers buy."""
    entries = _hostile_entries(sale.settings.max_entry_bytes)
    stream = sale.keys.stream(sale.product_id)
    for _ in range(20):
        pipe = sale.redis.pipeline(transaction=False)
        for fields in entries * 10:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        await pipe.execute()
    sale.notes.append(f"{20 * 10 * len(entries)} hostile stream entries")


async def _hostile_bff(sale: Sale) -> None:
    """Hostile requests at full rate at the BFF all through the sale, while the buyers
    buy through it: every one must get a 4xx, none a stream entry."""
    from .hostile import hammer, requests

    assert sale.bff is not None
    hostile = requests(sale.product_id, buyer=1, tokens=sale.bff.bad)
    stop = asyncio.Event()
    answers: list[Answer] = []
    firing = asyncio.create_task(hammer(sale.bff.url, hostile, stop, answers))
    try:
        await asyncio.wait([firing, asyncio.create_task(sale.done_buying.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        await firing
    sale.answers += answers
    statuses = Counter(a.status for a in answers)
    said = ", ".join(f"{status or 'no answer'} x{n}" for status, n in sorted(
        statuses.items(), key=lambda item: item[0] or 0))
    sale.notes.append(f"{len(answers)} hostile requests ({len(hostile)} kinds) at the BFF"
                      f" while {len(sale.users)} buyers bought through it: {said}")
    granted = sorted({a.what for a in answers if a.status is not None and a.status < 300})
    if granted:  # not a purchase (the stream shows), but worth a look
        sale.notes.append("answered 2xx: " + ", ".join(granted))


# -- RabbitMQ topology (the runner's own vhost on the shared broker) ------------------
async def _amqp(sale: Sale, action: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    conn = await aiormq.connect(sale.settings.amqp_url)
    try:
        await action(await conn.channel())
    finally:
        await conn.close()


async def _binding_deleted(sale: Sale) -> None:
    """Every binding of instance.created deleted (the events come back returned and stay
    on the stream), restored after TOPOLOGY_S.

    Two bindings cannot change at once, so the tap is unbound last and bound first: an
    event published between the two calls then reaches the tap (the checker's witness
    that it reached the exchange). Bound the other way round, an event the engine retried
    just as the bindings came back went to the Resource Domain's queue alone and was
    counted lost (make chaos 2026-12-07 03:05: 1 of 1,000, accepted at the unbind, its
    row and the Resource Domain's copy present)."""

    async def unbind(channel: Any) -> None:
        for queue in (QUEUE_CREATED, sale.tap_queue):
            await channel.queue_unbind(queue, EXCHANGE, routing_key=RK_CREATED)

    async def bind(channel: Any) -> None:
        for queue in (sale.tap_queue, QUEUE_CREATED):
            await channel.queue_bind(queue, EXCHANGE, routing_key=RK_CREATED)

    await _amqp(sale, unbind)
    await asyncio.sleep(TOPOLOGY_S)
    await _amqp(sale, bind)


async def _queue_deleted(sale: Sale) -> None:
    """The Resource Domain's queue deleted (with what it held), then re-declared by
    `seckill migrate` after TOPOLOGY_S. The tap is unbound meanwhile, so an event finds no
    queue and comes back returned, as in production where only that queue is bound."""

    async def delete(channel: Any) -> None:
        await channel.queue_unbind(sale.tap_queue, EXCHANGE, routing_key=RK_CREATED)
        await channel.queue_delete(QUEUE_CREATED)

    async def bind_tap(channel: Any) -> None:
        await channel.queue_bind(sale.tap_queue, EXCHANGE, routing_key=RK_CREATED)

    await _amqp(sale, delete)
    await asyncio.sleep(TOPOLOGY_S)
    # The workers are held while the queue and the tap come back one after the other:
    # an event published between the two would reach one and not the other (the tap is
    # ours, the window is not the engine's).
    workers = sale.engine.children()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)  # what was sent before the stop is routed or returned
        done = await asyncio.to_thread(subprocess.run, [SECKILL, "migrate"],
                                       env=to_env(sale.settings), capture_output=True,
                                       text=True, timeout=120)
        await _amqp(sale, bind_tap)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    if done.returncode:
        raise RuntimeError(f"seckill migrate failed: {done.stderr[-1000:]}")


# -- PostgreSQL ---------------------------------------------------------------------
FAILING_USER = 500  # bought mid-sale


def _constraint(sale: Sale) -> str:
    return f"chaos_refuse_{sale.product_id}"


async def _add_check(sale: Sale) -> None:
    """A CHECK that refuses one order's row (user FAILING_USER of this product), added
    before the engine starts."""
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        await conn.execute(f"ALTER TABLE seckill_logs ADD CONSTRAINT {_constraint(sale)} CHECK"
                           f" (product_id <> {sale.product_id} OR user_id <> {FAILING_USER})"
                           " NOT VALID")
    finally:
        await conn.close()


async def _row_always_fails(sale: Sale) -> None:
    """The refused order goes to the dead-letter stream after max_deliveries, with the
    reason; the other orders are not held up by it. The CHECK is dropped afterwards."""
    name = _constraint(sale)

    async def dead_lettered() -> bool:
        return bool(await sale.dead_letters())

    try:
        await wait_for(dead_lettered, 120, "the refused row dead-lettered")
    finally:
        conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
        try:
            await conn.execute(f"ALTER TABLE seckill_logs DROP CONSTRAINT IF EXISTS {name}")
        finally:
            await conn.close()


# -- services stopped, restarted, alarmed (private nodes) -----------------------------


async def _node(sale: Sale, action: str, *args: str) -> None:
    """Run one of the private node's blocking methods (start, stop, kill, ...)."""
    await asyncio.to_thread(getattr(sale.node, action), *args)


async def _rabbit_stopped(sale: Sale) -> None:
    await _node(sale, "stop")
    await asyncio.sleep(OUTAGE_S)
    await _node(sale, "start")


async def _rabbit_memory_alarm(sale: Sale) -> None:
    """A watermark no node can stay under: every publisher is blocked until restored."""
    await _node(sale, "ctl", "set_vm_memory_high_watermark", "0.0001")
    try:
        await asyncio.sleep(OUTAGE_S)
    finally:
        await _node(sale, "ctl", "set_vm_memory_high_watermark", "0.4")


async def _pg_immediate(sale: Sale) -> None:
    await _node(sale, "stop_immediately")
    await _node(sale, "start")


async def _pg_down(sale: Sale) -> None:
    await _node(sale, "stop_immediately")
    await asyncio.sleep(PG_DOWN_S)
    await _node(sale, "start")


BACKLOG_S = 2.0  # workers held while orders pile up in the stream before Redis dies


async def _redis_restart(sale: Sale) -> None:
    """Redis SIGKILLed with a backlog of accepted orders in the stream (the workers are
    held with SIGSTOP for BACKLOG_S while the buyers go on), then started again, no
    purchase in flight across it. With appendonly yes + appendfsync always it comes back
    with every acknowledged write; without persistence it comes back empty."""
    workers = sale.engine.children()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(BACKLOG_S)
        async with sale.buyers:
            backlog = await _unread(sale)
            await _node(sale, "kill")
            if sale.bff is not None:
                await _probe_bff(sale, "while Redis is down")
            else:
                await asyncio.sleep(1)
            await _node(sale, "start")
            await sale.reconnect_redis()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    sale.notes.append(f"{backlog} accepted orders were in the stream, not yet logged, when"
                      " Redis was killed")
    await asyncio.sleep(5)  # what the engine says about it, for the notes
    said = [line.split("] ", 1)[-1] for line in sale.output().splitlines()
            if "NOGROUP" in line or "lease lost" in line or "respawning" in line
            or STATE_LOST_LINE in line]
    if said:
        sale.notes.append("the engine logged: " + " / ".join(dict.fromkeys(said[:5])))
    lines = sale.output().count(STATE_LOST_LINE)
    sale.notes.append(f"the engine's 'Redis lost the gate's state' line: {lines} time(s)")
    if sale.fault.known_loss:
        metric = await _metric(sale, "seckill_redis_state_lost_total")
        sale.notes.append(f"seckill_redis_state_lost_total = {metric} (alert"
                          " SeckillRedisStateLost in engine/deploy/alerts.yml fires on it)")
    if sale.bff is not None:
        await _probe_bff(sale, "after Redis came back")


STATE_LOST_LINE = "Redis lost the gate's state"
PROBES = 20  # of each kind


async def _probe_bff(sale: Sale, when: str) -> None:
    """Purchases by new users and order lookups by buyers, logged ones and lost ones, at
    the BFF: each answer is recorded (a 500 or none fails the row) and tallied."""
    bff = sale.bff
    assert bff is not None
    logged = await _logged(sale)
    accepted = list(sale.buyer_of.items())
    lookups = ([u for sid, u in accepted if sid in logged][:PROBES]
               + [u for sid, u in accepted if sid not in logged][:PROBES])
    newcomers = range(sale.users.stop, sale.users.stop + PROBES)
    async with bff.client() as client:
        buys = await asyncio.gather(*(bff.buy(client, sale.product_id, u) for u in newcomers))
        orders = await asyncio.gather(*(bff.order(client, sale.product_id, u)
                                        for u in lookups))
    for what, replies in (("purchase", buys), ("order lookup", orders)):
        sale.answers += [Answer("probe", f"{what} {when}", status) for status, _ in replies]
        tally = Counter(f"{status or 'no answer'} {_said(body)}" for status, body in replies)
        sale.notes.append(f"BFF, {what}s {when}: " + ", ".join(
            f"{answer} x{n}" for answer, n in sorted(tally.items())))


def _said(body: dict[str, Any]) -> str:
    """The gist of a JSON answer: its status, state or error."""
    text = str(body.get("status") or body.get("state") or body.get("error") or body)
    return json.dumps(re.sub(r"\d+", "N", text)[:60])  # one line per kind, not per user


async def _logged(sale: Sale) -> set[str]:
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT stream_id FROM seckill_logs WHERE product_id = $1",
                                sale.product_id)
    finally:
        await conn.close()
    return {r["stream_id"] for r in rows}


async def _metric(sale: Sale, name: str) -> str:
    """A counter of the supervisor's /metrics (the sum over its workers)."""
    port = sale.fault.engine.get("metrics_port")
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError as exc:
        return f"unreadable ({type(exc).__name__})"
    found = re.findall(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return found[0] if found else "absent"


async def _unread(sale: Sale) -> int:
    """Entries of the sale's stream not yet delivered to a worker, plus those pending."""
    stream = sale.keys.stream(sale.product_id)
    for group in await sale.redis.xinfo_groups(stream):
        if group["name"] in (GROUP, GROUP.encode()):
            return int(group.get("lag") or 0) + int(group["pending"])
    return 0


REDIS_LOSS = ("Redis restarted without persistence: the stream, its pending entries, the"
              " stock and the buyers are gone; the orders accepted but not yet logged are"
              " lost. Prevented by appendonly yes + appendfsync always")


# -- the network, through the fault proxy -------------------------------------------
def network(service: str, kind: str) -> Fault:
    """The engine's and the Resource Domain's link to `service` through a fault proxy:
    cut (RST), blackhole, +LATENCY_S, a slow link; healed after OUTAGE_S."""
    commands = {"cut": "cut", "blackhole": "blackhole", "latency": f"latency {LATENCY_S}",
                "slow link": f"bandwidth {SLOW_LINK}"}

    async def inflict(sale: Sale) -> None:
        proxy = sale.proxy
        assert proxy is not None
        await asyncio.to_thread(proxy, commands[kind])
        if kind != "cut":
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(proxy, "heal")

    engine = {**NETWORK_QUICK, "claim_idle_ms": 5000}
    if kind == "cut":  # a cut takes no time
        return Fault(f"network {service}: {kind}", inflict, proxied=service, engine=engine)
    return outage(f"network {service}: {kind} {OUTAGE_S:.0f} s", inflict, OUTAGE_S,
                  proxied=service, engine=engine)


def outage(name: str, inflict: Callable[[Sale], Coroutine[Any, Any, None]], lasts: float,
           **kwargs: Any) -> Fault:
    """A fault that lasts `lasts` seconds: the buyers are paced so the sale outlasts it
    by a little (the fault begins once Fault.start_after of the stock is sold), so orders
    arrive all through it and the sale is over soon after."""
    start_after = kwargs.get("start_after", Fault.start_after)
    return Fault(name, inflict, sale_s=lasts / (1 - start_after) + 2, **kwargs)


def catalogue() -> list[Fault]:
    """Every fault, in the order they run."""
    faults = [batch_point(p) for p in POINTS]
    faults += [
        Fault("supervisor SIGKILL, restarted", _kill_supervisor,
              engine={"heartbeat_timeout": 5}),
        Fault("whole host SIGKILL, restarted", _kill_host),
        Fault("worker SIGSTOP past claim_idle_ms, SIGCONT", _stop_worker, sale_s=SHORT_SALE_S,
              engine={"claim_idle_ms": STOPPED_CLAIM_IDLE_MS, "heartbeat_timeout": 60}),
        Fault("bad input: malformed and oversized stream entries", _bad_input),
        Fault("bad input: hostile IDs, bodies and tokens at the BFF", _hostile_bff,
              bff=True, start_after=0.0),
        Fault("bus: forged INSTANCE_FAILED from the wrong broker users", forged_failures,
              sale_s=SHORT_SALE_S),
        Fault("bus: forged INSTANCE_CREATED from the wrong broker users", forged_orders),
        Fault("postgresql: one row always fails (CHECK)", _row_always_fails,
              prepare=_add_check, dead_letters_expected=1),
        outage("rabbitmq: binding deleted, restored", _binding_deleted, TOPOLOGY_S),
        outage("rabbitmq: queue deleted, re-declared by migrate", _queue_deleted, TOPOLOGY_S),
    ]
    faults += [
        outage(f"postgresql: down {PG_DOWN_S / 60:.0f} minutes", _pg_down, PG_DOWN_S,
               private="postgresql", engine=NETWORK_QUICK, lane=BESIDE),
        outage(f"rabbitmq: stopped {OUTAGE_S:.0f} s, started", _rabbit_stopped, OUTAGE_S,
               private="rabbitmq", engine=NETWORK_QUICK, lane=BESIDE),
        outage(f"rabbitmq: memory alarm {OUTAGE_S:.0f} s", _rabbit_memory_alarm, OUTAGE_S,
               private="rabbitmq", engine=NETWORK_QUICK, lane=BESIDE),
        Fault("postgresql: immediate shutdown, restarted", _pg_immediate,
              sale_s=SHORT_SALE_S, private="postgresql", engine=NETWORK_QUICK),
        Fault("redis: SIGKILL, restarted from its AOF (appendfsync always)", _redis_restart,
              sale_s=SHORT_SALE_S, private="redis-aof", engine=NETWORK_QUICK),
        Fault("redis: SIGKILL, restarted without persistence", _redis_restart,
              sale_s=SHORT_SALE_S, private="redis",
              engine={**NETWORK_QUICK, "metrics_port": free_port()},
              known_loss=REDIS_LOSS, bff=True),
    ]
    faults += [network(service, kind) for service in ("redis", "rabbitmq", "postgresql")
               for kind in ("cut", "blackhole", "latency", "slow link")]
    return faults + after_sell_out()


# -- the path after sell-out (issue 23) --------------------------------------------
CATCH_TRIES = 2000  # freezes of the workers to catch a failure not yet handed on


async def kill_engine_mid_handoff(sale: Sale) -> None:
    """Freeze the workers (SIGSTOP) until a FAILED order whose unit is not handed on yet
    is caught, then SIGKILL the engine's every process and start it again."""
    caught = 0
    for _ in range(CATCH_TRIES):
        workers = sale.engine.children()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        caught = await handoffs.count_rows(sale, "status = 'FAILED' AND compensated_at IS NULL")
        if caught:
            break
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    await asyncio.to_thread(sale.engine.kill_all)
    sale.notes.append(f"engine killed with {caught} failed order(s) not yet handed on"
                      if caught else "no failure was caught before its hand-off: killed anyway")
    sale.start_engine()
    await sale.booted()


async def kill_rd_mid_release(sale: Sale) -> None:
    """Owners release; the Resource Domain is SIGKILLed while it holds release claims
    (RELEASING, objects not deleted yet) and started again."""
    await wait_for(lambda: _enough_running(sale), 120, f"{handoffs.RELEASES} orders RUNNING")
    asked = await handoffs.request_releases(sale, handoffs.RELEASES)

    async def claimed() -> bool:
        return await handoffs.count_rd(sale, "RELEASING") > 0
    await wait_for(claimed, 60, "a release claimed by the Resource Domain")
    held = await handoffs.count_rd(sale, "RELEASING")
    assert sale.resource_domain is not None
    await asyncio.to_thread(sale.resource_domain.kill_all)
    sale.notes.append(f"{asked} releases asked; the Resource Domain killed holding {held}")
    sale.start_resource_domain()


async def _enough_running(sale: Sale) -> bool:
    return await handoffs.count_rows(sale, "status = 'RUNNING'") >= handoffs.RELEASES


async def redis_restart_mid_handoff(sale: Sale) -> None:
    """Releases asked while failures are handed on; Redis SIGKILLed once hand-offs are
    under way, and started again from its AOF (no purchase in flight across it)."""
    await wait_for(lambda: _enough_running(sale), 120, f"{handoffs.RELEASES} orders RUNNING")
    asked = await handoffs.request_releases(sale, handoffs.RELEASES)

    async def handing() -> bool:
        return await handoffs.count_rows(sale, "compensated_at IS NOT NULL") > 0
    await wait_for(handing, 60, "the first unit handed on")
    async with sale.buyers:
        handed = await handoffs.count_rows(sale, "compensated_at IS NOT NULL")
        await _node(sale, "kill")
        await asyncio.sleep(1)
        await _node(sale, "start")
        await sale.reconnect_redis()
    sale.notes.append(f"{asked} releases asked; Redis killed after {handed} unit(s) were "
                      "handed on")


# the path after sell-out: some provisionings fail, users wait for returned units
FAILING: dict[str, Any] = {"rd_failure_rate": 0.1, "rd_seed": 23}
WAITING = 300


def after_sell_out() -> list[Fault]:
    """The rows of issue 23: returned units (failures, releases) handed to the waitlist."""
    return [
        Fault("engine SIGKILL between a failure and its hand-off",
              kill_engine_mid_handoff, rd=FAILING, waiting=WAITING,
              start_after=0.1),
        Fault("resource domain SIGKILL mid-release", kill_rd_mid_release,
              rd={"rd_delay_ms": 200}, waiting=WAITING),
        Fault("redis: SIGKILL during hand-offs, restarted from its AOF",
              redis_restart_mid_handoff, sale_s=SHORT_SALE_S, private="redis-aof",
              engine=NETWORK_QUICK, rd=FAILING, waiting=WAITING),
    ]


CHEAPEST = ("SIGKILL after_read", "SIGKILL after_log_commit", "SIGKILL after_confirms")
