"""A short Locust rehearsal in the test suite, and proof that `make loadtest`'s runner
fails, with the reason, when Locust fails or measures 5xx answers, timeouts or too many
failures; and that the verifier can fail."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.devkeys import init_keys
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, engine_env, stop_process
from loadtest.judge import LocustReport, judge
from loadtest.verify import tried_key, verify

pytestmark = pytest.mark.timeout(240)
# loadtest/locustfile.py's USERS_PER_PROCESS (importing the locustfile would bring in
# gevent's monkey-patching)
USERS_PER_PROCESS = 10_000_000


def rehearse(settings: Settings, product_id: int, reports: Path, *args: str,
             timeout: float = 200) -> subprocess.CompletedProcess[str]:
    """`python -m loadtest.run` (what `make loadtest` runs) with a short scenario."""
    cmd = [sys.executable, "-m", "loadtest.run", "--users", "30", "--spawn-rate", "30",
           "--run-time", "3s", "--stock", "10", "--product", str(product_id),
           "--reports", str(reports), *args]
    return subprocess.run(cmd, env=engine_env(settings), capture_output=True, text=True,
                          timeout=timeout)


def failed_reasons(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(line for line in done.stdout.splitlines()
                     if line.startswith("LOAD TEST FAILED: "))


async def test_short_rehearsal_with_the_engine_passes_the_verifier(settings, product_id,
                                                                   tmp_path):
    # authentication on: Locust's users log in with tokens minted from a development key
    jwks, signing_key = init_keys(tmp_path / "keys")
    env = engine_env(settings, bff_auth="jwt", bff_jwks=str(jwks))
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--users", "300", "--spawn-rate", "150",
         "--run-time", "10s", "--stock", "80", "--product", str(product_id), "--engine",
         "--bff-workers", "1", "--processes", "2", "--reports", str(tmp_path)],
        env={**env, "SECKILL_LT_SIGNING_KEY": str(signing_key)}, capture_output=True,
        text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verifier: all invariants hold" in done.stdout
    assert list(tmp_path.glob("*_stats.csv")) and list(tmp_path.glob("*.html"))
    # two Locust processes drove the users: each names its own range of user IDs
    redis = Redis.from_url(settings.redis_url)
    try:
        tried = {int(u) for u in await redis.smembers(tried_key(Keys(settings.key_prefix),
                                                                 product_id))}
    finally:
        await redis.aclose()
    assert len({uid // USERS_PER_PROCESS for uid in tried}) == 2, sorted(tried)[:5]


async def test_the_verifier_reports_violations(settings, product_id):
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    try:
        sale = await gate.open_sale(product_id, 3)
        for uid in (1, 2):
            await gate.buy(product_id, uid)
            await redis.sadd(tried_key(keys, product_id), uid)
        assert await verify(settings, product_id, sale, 3) == []
        # a unit sold twice and a user accepted twice, as a broken gate would write them
        await redis.xadd(keys.stream(product_id), {"uid": "1", "ts": "1", "sale": sale,
                                                   "slot": "3"})
        problems = await verify(settings, product_id, sale, 3)
    finally:
        await redis.aclose()
    text = "\n".join(problems)
    assert "users accepted more than once" in text
    assert "accepted 3 != min(stock 3, tried 2)" in text
    assert "stock left 1 does not match 3 accepted of 3" in text


class StubHandler(http.server.BaseHTTPRequestHandler):
    """A gate that is up (`/healthz` answers) but answers every purchase with
    `post_status`, or never answers it when that is None (until `release` is set)."""

    post_status: int | None = None
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._answer(200)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.post_status is None:
            self.release.wait(120)
        else:
            self._answer(self.post_status)

    def _answer(self, status: int) -> None:
        body = b'{"error":"stub"}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_bff(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a StubHandler server answering POSTs with `request.param`."""
    handler = type("Stub", (StubHandler,), {"post_status": request.param,
                                            "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()


def test_a_bff_answering_503_fails_the_load_test(settings, product_id, tmp_path):
    # a real BFF whose Redis URL names a port nothing listens on: every purchase is a 503
    port = free_port()
    broken = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    bff = subprocess.Popen([SECKILL, "bff", "--port", str(port), "--workers", "1"],
                           env=engine_env(broken, bff_auth="none"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        done = rehearse(settings, product_id, tmp_path, "--host", f"http://127.0.0.1:{port}")
    finally:
        stop_process(bff)
    reasons = failed_reasons(done)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "answers were server errors (5xx)" in reasons and "HTTP 503" in reasons, \
        done.stdout[-5000:] + done.stderr[-5000:]


@pytest.mark.parametrize("stub_bff", [None], indirect=True)
def test_requests_that_time_out_fail_the_load_test(settings, product_id, tmp_path, stub_bff):
    done = rehearse(settings, product_id, tmp_path, "--host", stub_bff,
                    "--request-timeout", "1")
    reasons = failed_reasons(done)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "requests timed out" in reasons, reasons


@pytest.mark.parametrize("stub_bff", [400], indirect=True)
def test_failures_above_the_ratio_fail_the_load_test(settings, product_id, tmp_path, stub_bff):
    done = rehearse(settings, product_id, tmp_path, "--host", stub_bff)
    reasons = failed_reasons(done)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "failure ratio" in reasons and "is above the limit 0.001" in reasons, reasons
    assert "5xx" not in reasons and "timed out" not in reasons
    # the same failures under a limit that tolerates them: Locust's verdict passes (the
    # verifier still fails the run: nothing was accepted)
    tolerant = rehearse(settings, product_id, tmp_path, "--host", stub_bff,
                        "--max-failure-ratio", "1")
    assert failed_reasons(tolerant) == "", tolerant.stdout[-3000:]
    assert re.search(r"VIOLATION: accepted \d+ != min\(stock 10, tried 30\)", tolerant.stdout)


@pytest.mark.parametrize(("args", "reason"), [
    (("--run-time", "5x"), "Locust wrote no stats (exit code 2)"),
    (("--users", "0"), "Locust made no requests"),
])
def test_locust_itself_failing_fails_the_load_test(settings, product_id, tmp_path, args, reason):
    done = rehearse(settings, product_id, tmp_path, *args)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert reason in failed_reasons(done), done.stdout[-3000:]


@pytest.mark.parametrize(("returncode", "report", "reason"), [
    (0, LocustReport(1000, 1), None),  # exactly at the limit: tolerated
    (1, LocustReport(1000, 2), "failure ratio 0.0020 (2 of 1000 requests)"),
    (1, LocustReport(1000, 0), "Locust exited with 1 and recorded no failure"),
    (0, LocustReport(1000, 0, exceptions=3), "the Locust users raised 3 exceptions"),
    (-9, LocustReport(1000, 0), "Locust exited with -9"),
])
def test_the_locust_verdict_at_its_edges(returncode, report, reason):
    reasons = judge(returncode, report, max_failure_ratio=0.001)
    if reason is None:
        assert reasons == []
    else:
        assert any(reason in r for r in reasons), reasons
