"""The invariant checker on crafted ground truth: each kind of failure moves its count."""

from __future__ import annotations

import asyncpg
import pytest

from engine.resource_domain.service import SCHEMA as RD_SCHEMA
from engine.testing.invariants import (
    Accepted,
    Answer,
    Event,
    Row,
    assert_one_id_per_order,
    check,
    gate_problems,
    read_provisioned,
    read_rows,
    score,
)

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


def test_one_instance_id_given_to_two_orders_is_a_duplicate_of_both():
    rows = [Row(PID, "1-1", 101), Row(PID, "1-2", 101), ROWS[2]]
    events = [Event(PID, "1-1", 101), Event(PID, "1-2", 101), EVENTS[2]]
    result = score(ORDERS, rows, events, STOCK)
    assert (result.duplicated, result.lost, result.unexpected) == (2, 0, 0)
    assert "two orders share an instance ID" in check(ORDERS, rows, events).problems()


def test_a_second_row_for_an_order_is_a_duplicate():
    rows = [*ROWS, Row(PID, "1-1", 101)]
    assert score(ORDERS, rows, EVENTS, STOCK).duplicated == 1
    assert check(ORDERS, rows, EVENTS).problems() == ["an order has more than one row"]


def test_the_problems_name_each_violation_as_the_load_test_prints_it():
    assert check(ORDERS, ROWS, EVENTS, stock=STOCK).problems() == []
    stray = Event(PID, "9-9", 999)
    problems = check(ORDERS, [*ROWS[1:], Row(PID, "9-1", 901)], [*EVENTS[2:], stray],
                     stock={PID: 10}).problems()
    assert problems == ["1 accepted orders have no row, 1 rows match no accepted order",
                        "2 logged orders' events never reached the exchange",
                        "1 events match no logged order, e.g. instance 999 for entry '9-9'"]


def test_a_source_not_read_is_not_checked():
    assert check(ORDERS).problems() == []
    assert check(ORDERS, ROWS).problems() == []  # no tap: events not checked
    assert check(ORDERS, ROWS[:2]).problems() == [
        "1 accepted orders have no row, 0 rows match no accepted order"]


def test_the_gate_counters_agree_with_what_it_accepted():
    sold = [Accepted(PID, f"1-{n}", "sale-a", n, 10 + n) for n in (1, 2, 3)]
    assert gate_problems(sold, stock=3, tried=5, left=0) == []
    assert gate_problems(sold[:2], stock=3, tried=2, left=1) == []
    twice = [*sold[:2], Accepted(PID, "1-9", "sale-a", 3, 11)]
    assert gate_problems(twice, stock=3, tried=3, left=0) == [
        "1 users accepted more than once, e.g. [11]"]
    assert "stock is negative: -1" in gate_problems(sold, stock=3, tried=3, left=-1)
    assert "sold out but stock is 2" in gate_problems(sold, stock=3, tried=3, left=2)
    same_slot = [*sold[:2], Accepted(PID, "1-3", "sale-a", 1, 13)]
    assert gate_problems(same_slot, stock=3, tried=3, left=0) == [
        "slots sold twice: [1]", "sold out but not every slot 1..stock was used"]
    outside = [*sold[:2], Accepted(PID, "1-3", "sale-a", 4, 13)]
    assert "slots outside 1..3: [4]" in gate_problems(outside, stock=3, tried=3, left=0)
    assert "accepted 3 != min(stock 3, tried 2)" in gate_problems(sold, stock=3, tried=2,
                                                                  left=0)


def records(rows):
    return [{"product_id": r.product_id, "stream_id": r.stream_id,
             "instance_id": r.instance_id} for r in rows]


def test_the_tests_check_passes_a_clean_run_and_fails_each_violation():
    assert_one_id_per_order(records(ROWS), [*EVENTS, EVENTS[0]], 3)  # a repeat is fine
    broken = {
        "an order short": (ROWS[:2], EVENTS[:2], 3),
        "an event never came": (ROWS, EVENTS[:2], 3),
        "an event with another ID": (ROWS, [*EVENTS, Event(PID, "1-1", 999)], 3),
        "an event of no order": (ROWS, [*EVENTS, Event(PID, "9-9", 909)], 3),
        "one ID for two orders": ([ROWS[0], Row(PID, "1-2", 101), ROWS[2]],
                                  [EVENTS[0], Event(PID, "1-2", 101), EVENTS[2]], 3),
        "a second row": ([*ROWS, ROWS[0]], EVENTS, 3),
    }
    for what, (rows, events, orders) in broken.items():
        with pytest.raises(AssertionError):
            assert_one_id_per_order(records(rows), events, orders)
            pytest.fail(f"passed with {what}")


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
