"""The faults of the path after sell-out (bench/chaos/handoffs.py), through the chaos
runner on a small sale: nothing lost or handed twice, every order final in seconds.
The full rows (1,000 units each) are `make chaos`'s."""

from __future__ import annotations

import dataclasses

import pytest

from bench.chaos.faults import after_sell_out
from bench.chaos.runner import run_fault

# the Resource Domain starts from an empty queue: other tests' events are not ours
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("fresh_queues")]


async def test_a_resource_domain_killed_mid_release_loses_and_doubles_nothing(settings):
    fault = next(f for f in after_sell_out() if "mid-release" in f.name)
    result = await run_fault(settings, dataclasses.replace(fault, stock=200, waiting=60),
                             print)
    s = result.score
    assert (s.lost, s.duplicated, s.oversold, s.unexpected, s.provisioned_twice) == (
        0, 0, 0, 0, 0), result.as_dict()
    assert result.verdict == "pass", result.as_dict()
    assert result.final_s is not None and result.final_s < 15, result.as_dict()
    assert any("releases asked" in n for n in result.notes), result.notes
