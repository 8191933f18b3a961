"""The waitlist's invariants (`ledger_problems`): they hold on a sale whose units went
back and on to waiting users, and each one fails on input broken on purpose."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.gate.redis_gate import Gate
from engine.testing.invariants import Ledger, SaleEntry, ledger_problems, read_ledger

# stock 2: users 1 and 2 bought slots 1 and 2; 1's order failed and its unit went to
# waiting user 10 (turn 1); 2's order was released and its unit went to 11 (turn 2);
# 10's order failed too and, with nobody waiting, its unit went back to stock.
GOOD = Ledger(
    stock=2, left=1,
    entries=[SaleEntry("1-1", 1, 1), SaleEntry("1-2", 2, 2), SaleEntry("2-1", 10, 1, 1),
             SaleEntry("2-2", 11, 2, 2)],
    returned=frozenset({"1-1", "1-2", "2-1"}),
    statuses={"1-1": "FAILED", "1-2": "RELEASED", "2-1": "FAILED", "2-2": "RUNNING"},
    waiting=[5, 7])


def test_a_good_sale_holds_every_invariant():
    assert ledger_problems(GOOD) == []
    assert ledger_problems(replace(GOOD, statuses=None)) == []


@pytest.mark.parametrize("broken,problem", [
    # a returned unit made an order and a unit of stock too
    (replace(GOOD, left=2), "units: 2 in stock + 1 held by orders != stock 2"),
    # a returned unit made nothing
    (replace(GOOD, left=0), "units: 0 in stock + 1 held by orders != stock 2"),
    # the database says failed, the gate never returned the unit
    (replace(GOOD, returned=frozenset({"1-1", "1-2"}), left=0),
     "failed or released orders' units were never returned"),
    # returned, yet its row is running
    (replace(GOOD, statuses={**GOOD.statuses, "2-1": "RUNNING"}),
     "orders still live after their unit was returned"),
    # one unit handed to two waiting users
    (replace(GOOD, entries=[*GOOD.entries, SaleEntry("3-1", 12, 2, 3)], left=0),
     "units taken again while their order held them"),
    # an order from the waitlist with no returned unit behind it
    (replace(GOOD, stock=3, left=2, entries=[*GOOD.entries, SaleEntry("3-1", 12, 3, 3)]),
     "took a unit nobody returned"),
    # one user, two live orders
    (replace(GOOD, stock=3, left=0, entries=[*GOOD.entries, SaleEntry("3-1", 11, 3)]),
     "users hold two live orders"),
    # turn 2 served before turn 1
    (replace(GOOD, entries=[GOOD.entries[0], GOOD.entries[1], replace(GOOD.entries[2], turn=2),
                            replace(GOOD.entries[3], turn=1)]),
     "out of join order"),
    # turn 1 still waits while turn 2 got a unit
    (replace(GOOD, entries=[*GOOD.entries[:2], GOOD.entries[3]], left=1,
             returned=frozenset({"1-1", "1-2"}),
             statuses={"1-1": "FAILED", "1-2": "RELEASED", "2-2": "RUNNING"},
             waiting=[1, 5]), "waiting users were passed over"),
])
def test_each_invariant_fails_on_broken_input(broken, problem):
    problems = ledger_problems(broken)
    assert any(problem in p for p in problems), problems


async def test_the_ledger_of_a_real_sale(redis, keys, product_id):
    gate = Gate(redis, keys)
    sale = await gate.open_sale(product_id, 2)
    bought = [await gate.buy(product_id, u) for u in (1, 2)]
    for uid in (10, 11, 12):
        await gate.join_waitlist(product_id, uid)
    await gate.refund(product_id, 1, sale, bought[0].slot, bought[0].stream_id)
    ledger = await read_ledger(redis, keys, product_id, sale, 2)
    assert [e.turn for e in ledger.entries] == [None, None, 1]
    assert ledger.waiting == [2, 3] and ledger.left == 0
    assert ledger_problems(ledger) == []
    await redis.incr(keys.stock(product_id))  # a unit from nowhere
    assert ledger_problems(await read_ledger(redis, keys, product_id, sale, 2)) == [
        "units: 1 in stock + 2 held by orders != stock 2 (1 returned, 1 handed to the "
        "waitlist)"]
