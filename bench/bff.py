"""The HTTP gate against the gate called directly from Python, same load, same run.

The client side is a minimal keep-alive HTTP/1.1 client on raw asyncio
streams: a general-purpose client would cost more CPU than the server it
measures on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from engine.config import Settings
from engine.gate import Gate
from engine.keys import Keys

from .enginerun import engine_env

SECKILL = str(Path(sys.executable).with_name("seckill"))
PID = 990_000_020


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(latencies: list[float], accepted: int, seconds: float) -> dict[str, Any]:
    latencies.sort()
    n = len(latencies) or 1
    return {"requests": len(latencies), "accepted": accepted,
            "accepted_per_second": accepted / seconds,
            "requests_per_second": len(latencies) / seconds,
            "p50_ms": latencies[n // 2] * 1000 if latencies else 0.0,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if latencies else 0.0}


async def direct(settings: Settings, seconds: float, connections: int) -> dict[str, Any]:
    redis = Redis.from_url(settings.redis_url, max_connections=connections + 8)
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(PID, 10**9, clear_buyers=True)
    users = itertools.count(1)
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

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    took = time.perf_counter() - start
    await redis.aclose()
    return _summary(latencies, accepted, took)


async def over_http(port: int, seconds: float, connections: int,
                    first_user: int) -> dict[str, Any]:
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
    return _summary(latencies, accepted, time.perf_counter() - start)


async def measure_bff_vs_gate(settings: Settings, *, seconds: float = 10,
                              connections: int = 64) -> dict[str, Any]:
    gate = await direct(settings, seconds, connections)
    port = _free_port()
    workers = os.cpu_count() or 1
    proc = subprocess.Popen([SECKILL, "bff", "--port", str(port), "--workers", str(workers)],
                            env=engine_env(settings), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        await _wait(port)
        http = await over_http(port, seconds, connections, first_user=10**8)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"connections": connections, "bff_workers": workers, "gate_direct": gate,
            "bff": http, "ratio": http["accepted_per_second"] / gate["accepted_per_second"]}


async def _wait(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the BFF did not start")
