"""The HTTP gate against the gate called directly from Python, same load, same run.

Both sides get the same number of server processes on the same cores: the
direct gate runs in N Python processes sharing the connections, the HTTP
gate in N Granian workers. The HTTP load comes from wrk (C, one thread), so
the client costs little of the CPU it shares with the server; without wrk a
minimal keep-alive client on raw asyncio streams stands in, and the result
says which client was used (that one costs as much CPU as a gate worker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import uvloop
from redis.asyncio import Redis

from engine.config import Settings
from engine.connections import connect_redis
from engine.gate.client import Gate
from engine.keys import Keys

from .enginerun import children, cpu_seconds, engine_env, free_port

SECKILL = str(Path(sys.executable).with_name("seckill"))
PID = 990_000_020
HTTP_FIRST_USER = 10**12  # far above the direct gate's users: every attempt is a new buyer

# wrk: every request a new user (thread-local counters, one range per thread); the
# summary as one JSON line, latencies in microseconds.
WRK_SCRIPT = """
local threads = {}
local counter = 1
function setup(thread)
  thread:set("first", %(first)d + #threads * 100000000)
  table.insert(threads, thread)
end
function init(args)
  accepted = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  return wrk.format(nil, "%(path)s", nil, '{"user_id": ' .. (first + counter) .. '}')
end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("accepted") end
  io.write(string.format(
    '{"requests": %%d, "accepted": %%d, "seconds": %%f, "errors": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, total, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _summary(latencies: list[float], accepted: int, seconds: float) -> dict[str, Any]:
    latencies.sort()
    n = len(latencies) or 1
    return {"requests": len(latencies), "accepted": accepted,
            "accepted_per_second": accepted / seconds,
            "requests_per_second": len(latencies) / seconds,
            "p50_ms": latencies[n // 2] * 1000 if latencies else 0.0,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if latencies else 0.0}


async def _direct_calls(settings: Settings, seconds: float, connections: int,
                        first_user: int) -> tuple[list[float], int, float, float]:
    """One process's share: `connections` tasks calling the gate back to back, on the
    same client the BFF uses; (latencies, accepted, seconds, CPU seconds)."""
    redis = await connect_redis(settings, max_connections=connections + 8)
    gate = Gate(redis, Keys(settings.key_prefix), coalesce=True)  # as the BFF
    users = itertools.count(first_user)
    latencies: list[float] = []
    accepted = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal accepted
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            result = await gate.buy(PID, next(users))
            latencies.append(time.perf_counter() - t0)
            accepted += result.outcome == "accepted"

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(connections)))
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    await redis.aclose()
    return latencies, accepted, took, cpu


def _direct_process(args: tuple[Settings, float, int, int]
                    ) -> tuple[list[float], int, float, float]:
    return uvloop.run(_direct_calls(*args))


async def direct(settings: Settings, seconds: float, connections: int,
                 processes: int = 1) -> dict[str, Any]:
    """The gate from `processes` Python processes, `connections` concurrent calls in all."""
    redis = Redis.from_url(settings.redis_url)
    await Gate(redis, Keys(settings.key_prefix)).open_sale(PID, 10**9, clear_buyers=True)
    await redis.aclose()
    share = max(1, connections // processes)
    jobs = [(settings, seconds, share, 1 + i * 10**9) for i in range(processes)]
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = await asyncio.gather(*(loop.run_in_executor(pool, _direct_process, job)
                                       for job in jobs))
    latencies = [x for lat, _, _, _ in parts for x in lat]
    accepted = sum(a for _, a, _, _ in parts)
    took = max(t for _, _, t, _ in parts)
    cpu = sum(c for _, _, _, c in parts)
    return {**_summary(latencies, accepted, took), "processes": processes,
            "cpu_us_per_request": cpu / max(1, len(latencies)) * 1e6}


async def over_http_python(port: int, seconds: float, connections: int,
                           first_user: int) -> dict[str, Any]:
    """The fallback client: keep-alive HTTP/1.1 on raw asyncio streams."""
    users = itertools.count(first_user)
    latencies: list[float] = []
    accepted = 0
    end = time.perf_counter() + seconds
    path = f"/api/v1/seckill/{PID}".encode()

    async def one() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                body = b'{"user_id": %d}' % next(users)
                t0 = time.perf_counter()
                writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                accepted += status_line.split(b" ")[1] == b"202"
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return {**_summary(latencies, accepted, time.perf_counter() - start), "client": "python"}


async def over_http_wrk(wrk: str, port: int, seconds: float, connections: int,
                        first_user: int) -> dict[str, Any]:
    """wrk, one thread, `connections` keep-alive connections, a new user per request."""
    script = WRK_SCRIPT % {"first": first_user, "path": f"/api/v1/seckill/{PID}"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        proc = await asyncio.create_subprocess_exec(
            wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
            "-s", f.name, f"http://127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    finally:
        os.unlink(f.name)
    line = next((raw for raw in out.splitlines() if raw.startswith(b"{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    r = orjson.loads(line)
    return {"requests": r["requests"], "accepted": r["accepted"], "errors": r["errors"],
            "accepted_per_second": r["accepted"] / r["seconds"],
            "requests_per_second": r["requests"] / r["seconds"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "client": "wrk"}


async def load_server(proc: subprocess.Popen, port: int, log_name: str, seconds: float,
                      connections: int) -> dict[str, Any]:
    """Load an HTTP server we started (wrk, else the Python client) after a warm-up in
    which each of its workers opens its connections; its CPU per request is charged to
    the server process and its children over the measured window only."""
    wrk = shutil.which("wrk")

    async def load(seconds: float, first_user: int) -> dict[str, Any]:
        if wrk:
            return await over_http_wrk(wrk, port, seconds, connections, first_user)
        return await over_http_python(port, seconds, connections, first_user)

    await _wait(port, proc, log_name)
    await load(1.0, 2 * HTTP_FIRST_USER)
    servers = [proc.pid, *children(proc.pid)]
    cpu = sum(cpu_seconds(p) for p in servers)
    result = await load(seconds, HTTP_FIRST_USER)
    cpu = sum(cpu_seconds(p) for p in servers) - cpu
    result["cpu_us_per_request"] = cpu / max(1, result["requests"]) * 1e6
    return result


async def measure_bff_vs_gate(settings: Settings, *, seconds: float = 10,
                              connections: int = 64) -> dict[str, Any]:
    workers = os.cpu_count() or 1
    gate = await direct(settings, seconds, connections, processes=workers)
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="seckill-bench-bff-", suffix=".log")
    proc = subprocess.Popen([SECKILL, "bff", "--port", str(port), "--workers", str(workers)],
                            env=engine_env(settings, **_no_auth(settings)), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        http = await load_server(proc, port, log.name, seconds, connections)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"connections": connections, "bff_workers": workers, "gate_direct": gate,
            "bff": http, "client": http["client"],
            "ratio": http["accepted_per_second"] / gate["accepted_per_second"]}


def _no_auth(settings: Settings) -> dict[str, str]:
    """Both sides of the comparison name the buyer in the request, unauthenticated: the
    direct gate verifies no token, so neither does the HTTP gate here."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {"bff_auth": "none"} if "bff_auth" in names else {}


async def _wait(port: int, proc: subprocess.Popen, log: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            break
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    tail = Path(log).read_text(errors="replace")[-500:].strip()
    raise RuntimeError(f"the BFF did not start (exit {proc.poll()}): {tail}")
