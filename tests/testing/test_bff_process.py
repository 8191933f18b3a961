"""The BFF as a child: answering once the constructor returns, every process gone once
stopped, and a clear error with its own words when it cannot start."""

from __future__ import annotations

import httpx
import pytest

from engine.errors import ChildFailed
from engine.testing.bff import Bff
from engine.testing.ports import port_open
from engine.testing.processes import pid_alive

pytestmark = pytest.mark.timeout(120)


def test_the_bff_answers_once_started_and_leaves_nothing_once_stopped(settings):
    server = Bff(settings, workers=2, bff_auth="none")
    try:
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        metrics = httpx.get(server.admin_url + "/metrics", timeout=5)
        assert metrics.status_code == 200 and "seckill_bff" in metrics.text
        processes = [server.process.pid, *server.process.children()]
        assert len(processes) >= 3  # Granian's main process and its two workers
    finally:
        server.stop()
    assert not server.alive() and not port_open(server.port)
    assert not any(pid_alive(pid) for pid in processes)


def test_a_bff_that_cannot_start_says_why(settings):
    with pytest.raises(ChildFailed, match=r"exited:\n.*JWKS at /nonexistent/jwks.json"):
        Bff(settings, bff_auth="jwt", bff_jwks="/nonexistent/jwks.json")
