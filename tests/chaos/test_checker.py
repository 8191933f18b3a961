"""The checker's counts on crafted ground truth: each kind of failure moves its count."""

from __future__ import annotations

import time

import asyncpg

from bench.chaos.checker import (
    Accepted,
    Answer,
    Event,
    Row,
    drained_after,
    read_provisioned,
    read_rows,
    score,
)
from engine.resource_domain.service import SCHEMA as RD_SCHEMA

PID = 7
STOCK = {PID: 3}
ORDERS = [Accepted(PID, f"1-{n}", "sale-a", n) for n in (1, 2, 3)]
ROWS = [Row(PID, f"1-{n}", 100 + n) for n in (1, 2, 3)]
EVENTS = [Event(PID, f"1-{n}", 100 + n) for n in (1, 2, 3)]


def test_a_clean_run_counts_nothing_but_the_accepted_orders():
    redelivered = Event(PID, "1-2", 102)  # the same ID again: allowed
    result = score(ORDERS, ROWS, [*EVENTS, redelivered], STOCK, {101: 1, 102: 1, 103: 1},
                   recovery_s=1.5)
    assert (result.accepted, result.lost, result.duplicated, result.oversold,
            result.unexpected, result.recovery_s) == (3, 0, 0, 0, 0, 1.5)
    assert result.verdict() == "pass"


def test_the_bff_answering_4xx_to_hostile_requests_and_503_to_buyers_passes():
    answers = [Answer("hostile", "alg=none", 401), Answer("hostile", "bad JSON", 400),
               Answer("buyer", "buy", 202), Answer("probe", "order", 503)]
    result = score(ORDERS, ROWS, EVENTS, STOCK, entries=[o.key for o in ORDERS],
                   answers=answers)
    assert (result.server_errors, result.unexpected, result.verdict()) == (0, 0, "pass")
    assert score(ORDERS, ROWS, EVENTS, STOCK).server_errors is None  # no BFF in front


def test_a_5xx_or_no_answer_to_a_hostile_request_fails_the_row():
    for status in (500, 502, 503, None):
        answers = [Answer("hostile", "body user_id > int64", status),
                   Answer("hostile", "garbage", 401)]
        result = score(ORDERS, ROWS, EVENTS, STOCK, answers=answers)
        assert result.server_errors == 1, status
        assert result.verdict() == "fail"
        assert result.examples["server_errors"] == [
            f"{status or 'no answer'} to hostile body user_id > int64"]


def test_a_500_or_no_answer_to_a_buyer_fails_the_row_even_with_a_known_loss():
    for status in (500, None):
        result = score(ORDERS[:2], ROWS[:2], EVENTS[:2], STOCK,
                       answers=[Answer("probe", "order lookup", status)])
        assert result.server_errors == 1
        assert result.verdict("Redis without persistence") == "fail"
    known = score(ORDERS, ROWS[:2], EVENTS[:2], STOCK, answers=[Answer("probe", "buy", 404)])
    assert known.verdict("Redis without persistence").startswith("known loss")


def test_a_stream_entry_for_no_accepted_order_is_unexpected():
    entries = [*(o.key for o in ORDERS), (PID, "9-9")]  # written for a hostile request
    result = score(ORDERS, ROWS, EVENTS, STOCK, entries=entries, answers=[])
    assert (result.unexpected, result.lost, result.server_errors) == (1, 0, 0)
    assert result.examples["unexpected"] == [f"{PID}/9-9"]
    assert result.verdict() == "fail"


def test_an_order_without_a_row_is_lost():
    result = score(ORDERS, ROWS[:2], EVENTS[:2], STOCK)
    assert result.lost == 1
    assert result.examples["lost"] == [f"{PID}/1-3"]
    assert result.verdict() == "fail"


def test_a_row_whose_event_never_came_is_lost():
    assert score(ORDERS, ROWS, EVENTS[:2], STOCK).lost == 1


def test_an_event_with_another_instance_id_is_a_duplicate():
    result = score(ORDERS, ROWS, [*EVENTS, Event(PID, "1-1", 999)], STOCK)
    assert (result.duplicated, result.lost) == (1, 0)


def test_an_instance_provisioned_twice_is_a_duplicate():
    result = score(ORDERS, ROWS, EVENTS, STOCK, {101: 2, 102: 1, 103: 1})
    assert (result.duplicated, result.provisioned_twice) == (1, 1)


def test_two_instances_provisioned_for_one_order_are_one_duplicate():
    events = [*EVENTS, Event(PID, "1-1", 999)]
    result = score(ORDERS, ROWS, events, STOCK, {101: 1, 999: 1, 102: 1, 103: 1})
    assert (result.duplicated, result.provisioned_twice) == (1, 1)


def test_more_sold_than_the_stock_is_oversold():
    extra = Accepted(PID, "1-4", "sale-a", 4)
    result = score([*ORDERS, extra], [*ROWS, Row(PID, "1-4", 104)],
                   [*EVENTS, Event(PID, "1-4", 104)], STOCK)
    assert (result.oversold, result.lost, result.unexpected) == (1, 0, 0)


def test_one_unit_sold_twice_is_oversold_even_within_the_stock():
    twice = [ORDERS[0], Accepted(PID, "1-9", "sale-a", 1)]
    result = score(twice, [ROWS[0], Row(PID, "1-9", 109)],
                   [EVENTS[0], Event(PID, "1-9", 109)], STOCK)
    assert result.oversold == 1


def test_rows_and_events_of_no_accepted_order_are_unexpected():
    result = score(ORDERS, [*ROWS, Row(PID, "9-1", 901)],
                   [*EVENTS, Event(PID, "9-1", 901), Event(PID, "9-2", 902)], {PID: 10})
    assert (result.unexpected, result.lost) == (2, 0)


def test_a_known_loss_is_named_not_hidden():
    lost = score(ORDERS, ROWS[:2], EVENTS[:2], STOCK)
    assert lost.verdict("Redis restarted without persistence") == (
        "known loss: Redis restarted without persistence")
    doubled = score(ORDERS, ROWS[:2], [*EVENTS[:2], Event(PID, "1-1", 999)], STOCK)
    assert doubled.verdict("Redis restarted without persistence") == "fail"


async def test_recovery_is_timed_from_the_fault_end_and_none_if_never_drained():
    checks = iter([False, False, True])

    async def drains() -> bool:
        return next(checks)

    fault_end = time.monotonic()
    seconds = await drained_after(fault_end, drains, timeout=30, interval=0.05)
    assert seconds is not None and seconds >= 0.1

    async def never() -> bool:
        return False

    assert await drained_after(time.monotonic(), never, timeout=0.2, interval=0.05) is None


async def test_rows_and_provisionings_are_read_from_postgresql(settings, product_id):
    conn = await asyncpg.connect(settings.pg_dsn)
    ids = [product_id * 10 + n for n in (1, 2)]  # instance IDs no other test takes
    try:
        await conn.execute(RD_SCHEMA)
        await conn.executemany(
            "INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id)"
            " VALUES ($1, $2, $3, $4)", [(product_id, 1, ids[0], "1-1"),
                                         (product_id, 2, ids[1], "1-2")])
        await conn.execute("INSERT INTO resource_domain.instances (instance_id, user_id,"
                           " status, attempts) VALUES ($1, 1, 'RUNNING', 2)", ids[0])
        rows = await read_rows(conn, [product_id])
        assert sorted(rows, key=lambda r: r.stream_id) == [
            Row(product_id, "1-1", ids[0]), Row(product_id, "1-2", ids[1])]
        assert await read_provisioned(conn, ids) == {ids[0]: 2}
    finally:
        await conn.execute("DELETE FROM resource_domain.instances"
                           " WHERE instance_id = ANY($1::bigint[])", ids)
        await conn.close()
