"""The HTTP floor (issue 13's performance target): what serving HTTP costs at all.

Granian serving a bare app that reads the request and answers a fixed 202, on
the same interface as the BFF (`bff_interface`: RSGI by default, ASGI too), with
as many workers and the same loop, loaded by the same client (wrk if installed,
else the bench's Python client) with the same requests. Its server CPU per
request is the floor the BFF's own cost is measured against, on the interface the
BFF is served with (an ASGI floor costs about half as much again as an RSGI one,
so it would flatter an RSGI BFF): BFF CPU per accepted purchase <= 1.15 x (floor +
direct gate per call) in `make bench`, server CPU per answered attempt <= 1.3 x
floor in `make burst`.

    python -m bench.floor [--seconds 10] [--connections 64] [--workers N] [--interface rsgi]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from engine.testing.ports import free_port

from .httpload import Load, buy_path, load_server

BODY = b'{"status":"accepted","stream_id":"0-1","slot":1}'
HEADERS = [(b"content-type", b"application/json")]
PATH = buy_path(1)  # any purchase: the floor answers every request alike


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Reads the whole request, answers a fixed 202: HTTP and ASGI, and nothing else."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 202, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


class RsgiApp:
    """The same floor over Granian's RSGI interface (the BFF's default)."""

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        await protocol()
        protocol.response_bytes(202, RSGI_HEADERS, BODY)


RSGI_HEADERS = [("content-type", "application/json")]
rsgi_app = RsgiApp()


def serve(port: int, workers: int, interface: str = "asgi") -> None:
    """Granian as `seckill bff` runs it (engine.gate.app.granian_options: uvloop, its HTTP
    mode and limits, backlog and log level), with the floor app of `interface`."""
    from granian import Granian
    from granian.constants import Interfaces

    from engine.config import load_settings
    from engine.gate.app import granian_options

    target = "bench.floor:app" if interface == "asgi" else "bench.floor:rsgi_app"
    Granian(target, interface=Interfaces(interface), address="127.0.0.1", port=port,
            workers=workers, **granian_options(load_settings())).serve()


def start_floor(workers: int, interface: str = "asgi"
                ) -> tuple[subprocess.Popen, int, Any]:
    """The floor server, started: (process, port, log file)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="seckill-bench-floor-", suffix=".log")
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", str(port),
                             "--workers", str(workers), "--interface", interface],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, port, log


async def measure_floor(*, seconds: float = 10, connections: int = 64,
                        workers: int | None = None, load: Load | None = None,
                        warmup: Load | None = None, interface: str = "asgi",
                        profile: Path | None = None) -> dict[str, Any]:
    """Requests/s, p50/p99 and server CPU per request of the floor, under `load` (the
    BFF's own requests when the suite measures both; anonymous purchases by default)."""
    workers = workers or os.cpu_count() or 1
    load = load or Load((PATH,), first_user=1)
    warmup = warmup or Load((PATH,), first_user=10**9)
    proc, port, log = start_floor(workers, interface)
    try:
        result = await load_server(proc, port, log.name, seconds, connections, load, warmup,
                                   profile)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"workers": workers, "connections": connections, "interface": interface, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--interface", choices=("asgi", "rsgi"), default="asgi")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.workers or os.cpu_count() or 1, args.interface)
        return 0
    result = asyncio.run(measure_floor(seconds=args.seconds, connections=args.connections,
                                       workers=args.workers, interface=args.interface))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
