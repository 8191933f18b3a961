"""Snowflake IDs and node leases, against the real Redis where leases are involved."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest
from redis.asyncio import Redis

from engine.errors import ClockMovedBackwards, InvalidInput, LeaseLost, NoFreeNodeId
from engine.keys import Keys
from engine.pipeline.ids import EPOCH_MS, MAX_NODES, NodeLease, Snowflake, compose, decompose
from engine.testing.waits import wait_for


class FakeClock:
    """An injected wall clock and monotonic clock (pure logic: no service is faked here).

    Sleeping moves both forward; `stall` seconds are added to every sleep, the way an
    overloaded machine wakes a sleeper late. A rollback moves only the wall clock.
    """

    def __init__(self, ms: int, *, stall: float = 0.0) -> None:
        self.ms = ms
        self.mono = 1000.0
        self.stall = stall
        self.slept: list[float] = []

    def __call__(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)
        self.mono += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.001, seconds) + self.stall)


def test_compose_decompose_round_trip():
    ms = EPOCH_MS + 123_456_789
    i = compose(ms - EPOCH_MS, 1023, 4095)
    assert decompose(i) == (ms, 1023, 4095)
    assert 0 < Snowflake(5).next_id() < 2**63


def test_ids_increase_and_carry_the_node():
    gen = Snowflake(77)
    ids = gen.take(10_000)
    assert ids == sorted(ids) and len(set(ids)) == 10_000
    assert {decompose(i)[1] for i in ids} == {77}


def test_bad_node_ids():
    for bad in (-1, 1024, True, "3"):
        with pytest.raises(InvalidInput):
            Snowflake(bad)  # type: ignore[arg-type]


def test_small_rollback_is_waited_out():
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = Snowflake(1, clock=clock, sleep=clock.sleep, max_rollback_ms=50)
    first = gen.next_id()
    clock.ms -= 30
    second = gen.next_id()
    assert second > first and clock.slept


def test_large_rollback_raises():
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = Snowflake(1, clock=clock, sleep=clock.sleep, max_rollback_ms=50)
    gen.next_id()
    clock.ms -= 51
    with pytest.raises(ClockMovedBackwards, match="moved back 51 ms"):
        gen.next_id()


def test_4097th_id_in_one_millisecond_waits_for_the_next():
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = Snowflake(1, clock=clock, sleep=clock.sleep)
    ids = gen.take(4097)
    assert len(set(ids)) == 4097 and ids == sorted(ids)
    assert decompose(ids[4095])[0] == EPOCH_MS + 10_000
    assert decompose(ids[4096])[0] == EPOCH_MS + 10_001
    assert clock.slept


def _generate(url: str, prefix: str, n: int, out: mp.Queue) -> None:
    async def run() -> tuple[int, list[int]]:
        redis = Redis.from_url(url)
        lease = NodeLease(redis, Keys(prefix), owner=f"proc-{mp.current_process().pid}",
                          ttl_ms=30_000)
        node = await lease.acquire()
        gen = Snowflake(node, lease=lease)
        ids: list[int] = []
        while len(ids) < n:
            ids += gen.take(min(500, n - len(ids)))
        await lease.release()
        await redis.aclose()
        return node, ids
    out.put(asyncio.run(run()))


def test_eight_processes_100k_ids_each_all_distinct(settings):
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_generate, args=(settings.redis_url, settings.key_prefix,
                                                100_000, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    nodes = [node for node, _ in results]
    assert len(set(nodes)) == 8
    every = [i for _, ids in results for i in ids]
    assert len(every) == 800_000 and len(set(every)) == 800_000
    for _, ids in results:
        assert all(a < b for a, b in zip(ids, ids[1:], strict=False))


async def test_the_1025th_claimant_gets_a_clear_error(settings, redis):
    keys = Keys(settings.key_prefix)
    leases = [NodeLease(redis, keys, owner=f"o{i}", ttl_ms=60_000) for i in range(MAX_NODES)]
    nodes = [await lease.acquire() for lease in leases]
    assert sorted(nodes) == list(range(MAX_NODES))
    with pytest.raises(NoFreeNodeId, match="all 1024 snowflake node IDs are leased"):
        await NodeLease(redis, keys, owner="late", ttl_ms=60_000).acquire()


async def test_an_expired_lease_is_reclaimable(settings, redis):
    keys = Keys(settings.key_prefix)
    for n in range(MAX_NODES):
        if n != 42:
            await redis.set(keys.node(n), "someone", px=60_000)
    first = NodeLease(redis, keys, owner="first", ttl_ms=200)
    assert await first.acquire() == 42

    async def expired() -> bool:  # by its own clock and in Redis
        return not first.valid and not await redis.exists(keys.node(42))
    await wait_for(expired, 10, "the 200 ms lease expired", interval=0.02)
    with pytest.raises(LeaseLost):
        first.check()
    second = NodeLease(redis, keys, owner="second", ttl_ms=60_000)
    assert await second.acquire() == 42
    assert not await first.renew()  # the first owner can never take it back
    await first.release()
    assert await redis.get(keys.node(42)) == b"second"


async def test_lease_stops_ids_before_it_can_expire(settings, redis):
    now = [1000.0]
    lease = NodeLease(redis, Keys(settings.key_prefix), owner="me", ttl_ms=10_000,
                      clock=lambda: now[0])
    node = await lease.acquire()
    gen = Snowflake(node, lease=lease)
    gen.take(10)
    now[0] += 9.4  # still inside ttl minus the safety margin
    gen.take(10)
    now[0] += 0.2  # 9.6 s: within the last 500 ms before Redis could expire it
    with pytest.raises(LeaseLost, match="not renewed in time"):
        gen.take(10)
    assert await lease.renew()
    gen.take(10)


async def test_renew_after_the_key_was_stolen(settings, redis):
    keys = Keys(settings.key_prefix)
    lease = NodeLease(redis, keys, owner="me", ttl_ms=10_000)
    node = await lease.acquire()
    await redis.set(keys.node(node), "thief")
    assert not await lease.renew()
    with pytest.raises(LeaseLost, match="taken by someone else"):
        lease.check()
    await lease.release()
    assert await redis.get(keys.node(node)) == b"thief"
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(lease.keep_alive(interval=0.01), 5)


async def test_renew_after_the_key_vanished_says_so(settings, redis):
    # Redis lost its state (or the key expired): nobody took it, and the error says that
    keys = Keys(settings.key_prefix)
    lease = NodeLease(redis, keys, owner="me", ttl_ms=10_000)
    node = await lease.acquire()
    await redis.delete(keys.node(node))
    assert not await lease.renew()
    with pytest.raises(LeaseLost, match="lease key gone") as lost:
        lease.check()
    assert "someone else" not in str(lost.value)
    with pytest.raises(LeaseLost, match="lease key gone"):
        await asyncio.wait_for(lease.keep_alive(interval=0.01), 5)


async def _leased(redis, settings, clock: FakeClock, **kw) -> Snowflake:
    """A generator on a real 10 s lease (valid for 9.5 s) that runs on `clock`."""
    lease = NodeLease(redis, Keys(settings.key_prefix), owner="me", ttl_ms=10_000,
                      clock=clock.monotonic)
    node = await lease.acquire()
    return Snowflake(node, clock=clock, sleep=clock.sleep, lease=lease, **kw)


async def test_a_rollback_wait_the_lease_cannot_outlive_raises_lease_lost(settings, redis):
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = await _leased(redis, settings, clock, max_rollback_ms=2000)
    first = gen.next_id()
    clock.advance(8.0)  # 1.5 s of validity left, renewal late
    assert gen.next_id() > first
    clock.ms -= 1800  # within the rollback bound, beyond the lease's deadline
    with pytest.raises(LeaseLost, match="longer than the lease stays valid"):
        gen.next_id()
    assert clock.slept == []  # failed at once: the event loop (renewal) was never blocked


async def test_a_rollback_wait_that_overruns_the_lease_raises_lease_lost(settings, redis):
    clock = FakeClock(EPOCH_MS + 10_000, stall=1.0)  # every sleep wakes 1 s late
    gen = await _leased(redis, settings, clock, max_rollback_ms=2000)
    gen.next_id()
    clock.advance(8.0)
    gen.next_id()
    clock.ms -= 1000  # 1 s wait fits the 1.5 s left, but the stall crosses the deadline
    with pytest.raises(LeaseLost, match="not renewed in time"):
        gen.next_id()
    assert clock.slept == [1.0]


async def test_a_rollback_wait_inside_the_lease_issues_ids(settings, redis):
    clock = FakeClock(EPOCH_MS + 10_000)
    gen = await _leased(redis, settings, clock, max_rollback_ms=2000)
    first = gen.next_id()
    clock.ms -= 1800
    assert gen.next_id() > first and clock.slept == [1.8]


async def test_release_deletes_our_key_only(settings, redis):
    keys = Keys(settings.key_prefix)
    mine = NodeLease(redis, keys, owner="me", ttl_ms=10_000)
    node = await mine.acquire()
    assert await redis.get(keys.node(node)) == b"me"
    await mine.release()
    assert await redis.exists(keys.node(node)) == 0
    with pytest.raises(LeaseLost):
        mine.check()
    # our lease expired and someone else holds the node now; we have not noticed yet
    again = NodeLease(redis, keys, owner="me", ttl_ms=10_000)
    node = await again.acquire()
    await redis.set(keys.node(node), "other", px=10_000)
    await again.release()
    assert await redis.get(keys.node(node)) == b"other"
