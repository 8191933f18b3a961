"""The three cheapest faults of `make chaos`, through the same runner: a worker SIGKILLed
after the read, after the log commit and after the confirms, each under a live sale with
the engine, the status loop and the Resource Domain running; every count 0, verdict pass."""

from __future__ import annotations

import pytest

from bench.chaos.faults import CHEAPEST, catalogue
from bench.chaos.runner import run_fault

# the Resource Domain starts from an empty queue: other tests' events are not ours
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("fresh_queues")]


@pytest.mark.parametrize("name", CHEAPEST)
async def test_a_cheap_fault_costs_nothing(settings, name):
    fault = next(f for f in catalogue() if f.name == name)
    result = await run_fault(settings, fault, print)
    s = result.score
    assert s.accepted == fault.stock
    assert (s.lost, s.duplicated, s.oversold, s.unexpected, s.provisioned_twice) == (
        0, 0, 0, 0, 0), result.as_dict()
    assert s.recovery_s is not None
    assert result.verdict == "pass", result.as_dict()
