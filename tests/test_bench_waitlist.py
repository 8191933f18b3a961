"""`python -m bench.waitlistscript`, tiny: every contestant's calls do their work (a
purchase accepted, a join joined, a handoff handed, a return to stock returned), so the
figures it prints are per call of the path it names."""

from __future__ import annotations

import shutil

import pytest

from bench.waitlistscript import Contestant, measure
from engine.resources import lua_script

pytestmark = pytest.mark.timeout(120)


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="no redis-benchmark")
def test_every_call_does_the_work_it_is_priced_for():
    contestants = [Contestant("purchase", lua_script("seckill.lua"), 1),
                   Contestant("join", lua_script("waitlist.lua"), 2),
                   Contestant("handoff", lua_script("refund.lua"), 3),
                   Contestant("to_stock", lua_script("refund.lua"), 4)]
    (row,) = measure(contestants, 500, 1)
    for who in contestants:  # (a random user or order drawn twice does nothing)
        assert row[who.name]["done"] >= 495, (who.name, row[who.name])
