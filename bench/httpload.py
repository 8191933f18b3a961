"""The HTTP load of the benchmark: the requests of one window, the clients that send
them (wrk if installed, else a minimal keep-alive client on raw asyncio streams), and
the server CPU a window cost (the server process and its children's clock ticks).

bench/bff.py loads the BFF and the HTTP floor with it, bench/floor.py the floor alone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.testing.processes import children

from .enginerun import cpu_ns, cpu_ticks
from .tokens import TokenFile

# wrk: POSTs of a purchase, every one by a new buyer. With a token file, request i
# sends token i mod N with its user's ID in the body, on product path i div N (then
# stops: a repeated pair would be a duplicate, not a purchase); without one, user IDs
# counted from @FIRST@ on the first path. The summary is one JSON line, latencies in
# microseconds.
WRK_SCRIPT = """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  accepted, exhausted, sent = 0, 0, 0
  users, auth = {}, {}
  local file = "@TOKENS@"
  if file ~= "" then
    for line in io.lines(file) do
      local sp = line:find(" ")
      users[#users + 1] = line:sub(1, sp - 1)
      auth[#auth + 1] = "Bearer " .. line:sub(sp + 1)
    end
  end
  paths = {@PATHS@}
end
function request()
  if #users == 0 then
    sent = sent + 1
    return wrk.format("POST", paths[1], {["Content-Type"] = "application/json"},
                      '{"user_id": ' .. (@FIRST@ + sent) .. '}')
  end
  local path = paths[math.floor(sent / #users) + 1]
  if path == nil then
    exhausted = 1
    wrk.thread:stop()
    path = paths[1]
  end
  local i = sent % #users + 1
  sent = sent + 1
  return wrk.format("POST", path, {["Content-Type"] = "application/json",
                                   ["Authorization"] = auth[i]},
                    '{"user_id": ' .. users[i] .. '}')
end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 end
end
function done(summary, latency, requests)
  local total, out = 0, 0
  for _, t in ipairs(threads) do
    total = total + t:get("accepted")
    out = out + t:get("exhausted")
  end
  io.write(string.format(
    '{"requests": %d, "accepted": %d, "seconds": %f, "errors": %d, '
    .. '"p50_us": %d, "p99_us": %d, "exhausted": %d}\\n',
    summary.requests, total, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), out))
end
"""


@dataclass(frozen=True)
class Load:
    """The requests of one window (see WRK_SCRIPT): with `tokens`, each token on each
    of `paths` in turn; without, users counted from `first_user` on paths[0]."""

    paths: tuple[str, ...]
    tokens: TokenFile | None = None
    first_user: int = 0

    def wrk_script(self) -> str:
        return (WRK_SCRIPT.replace("@TOKENS@", str(self.tokens.path) if self.tokens else "")
                .replace("@PATHS@", ", ".join(f'"{p}"' for p in self.paths))
                .replace("@FIRST@", str(self.first_user)))

    def requests(self) -> Iterator[bytes]:
        """The same requests as whole HTTP/1.1 messages, for the Python client."""
        if self.tokens is None:
            for user in itertools.count(self.first_user + 1):
                yield _post(self.paths[0], b'{"user_id": %d}' % user, b"")
            return
        lines = self.tokens.lines()
        for path in self.paths:
            for user, token in lines:
                yield _post(path, b'{"user_id": %d}' % user,
                            b"Authorization: Bearer " + token + b"\r\n")


def _post(path: str, body: bytes, extra: bytes) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n" + extra
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def buy_path(pid: int) -> str:
    return f"/api/v1/seckill/{pid}"


def summary(latencies: list[float], accepted: int, seconds: float) -> dict[str, Any]:
    latencies.sort()
    n = len(latencies) or 1
    return {"requests": len(latencies), "accepted": accepted,
            "accepted_per_second": accepted / seconds,
            "requests_per_second": len(latencies) / seconds,
            "p50_ms": latencies[n // 2] * 1000 if latencies else 0.0,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if latencies else 0.0}


async def over_http_python(port: int, seconds: float, connections: int,
                           load: Load) -> dict[str, Any]:
    """The fallback client: keep-alive HTTP/1.1 on raw asyncio streams."""
    requests = load.requests()
    latencies: list[float] = []
    accepted = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                request = next(requests, None)
                if request is None:
                    return
                t0 = time.perf_counter()
                writer.write(request)
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
    took = time.perf_counter() - start
    return {**summary(latencies, accepted, took), "seconds": took, "client": "python"}


async def over_http_wrk(wrk: str, port: int, seconds: float, connections: int,
                        load: Load) -> dict[str, Any]:
    """wrk, one thread, `connections` keep-alive connections, a new buyer per request."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(load.wrk_script())
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
            "seconds": r["seconds"],
            "accepted_per_second": r["accepted"] / r["seconds"],
            "requests_per_second": r["requests"] / r["seconds"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "client": "wrk",
            "tokens_exhausted": bool(r["exhausted"])}


async def load_window(proc: subprocess.Popen, port: int, seconds: float, connections: int,
                      load: Load) -> dict[str, Any]:
    """One measured window on a server we started: its CPU (the server process and its
    children) per request and per accepted request, in the kernel's nanoseconds
    (bench.enginerun.cpu_ns), with the clock ticks behind it."""
    wrk = shutil.which("wrk")
    servers = [proc.pid, *children(proc.pid)]
    ticks, used = sum(cpu_ticks(p) for p in servers), sum(cpu_ns(p) for p in servers)
    if wrk:
        result = await over_http_wrk(wrk, port, seconds, connections, load)
    else:
        result = await over_http_python(port, seconds, connections, load)
    used = sum(cpu_ns(p) for p in servers) - used
    ticks = sum(cpu_ticks(p) for p in servers) - ticks
    cpu_us = used / 1e3
    return {**result, "ticks": ticks, "cpu_ns": used,
            "cpu_us_per_request": cpu_us / max(1, result["requests"]),
            "cpu_us_per_accepted": cpu_us / max(1, result["accepted"])}


async def load_server(proc: subprocess.Popen, port: int, log_name: str, seconds: float,
                      connections: int, load: Load, warmup: Load,
                      profile: Path | None = None) -> dict[str, Any]:
    """Load an HTTP server we started after a 1 s warm-up load (`warmup`: its own
    buyers) in which each of its workers opens its connections; with `profile`, py-spy
    samples its workers over the window."""
    await wait_listening(port, proc, log_name)
    await load_window(proc, port, 1.0, connections, warmup)
    spies = spy_on(children(proc.pid), seconds, profile)
    try:
        return await load_window(proc, port, seconds, connections, load)
    finally:
        for spy in spies:
            spy.wait(30)


def spy_on(workers: list[int], seconds: float, profile: Path | None, tag: str = ""
           ) -> list[subprocess.Popen[bytes]]:
    """py-spy on each worker for about `seconds` (with native frames: Granian's and
    uvloop's), collapsed stacks in `profile`-<pid>`tag`.txt; none without `profile`."""
    if profile is None:
        return []
    if profile.suffix == ".perf":  # perf: every thread, by library, barely slowed down
        return [subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o",
                                  f"{profile}-{workers[0]}{tag}.data", "-p",
                                  ",".join(map(str, workers)), "--", "sleep",
                                  str(max(1, round(seconds) - 1))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([spy, "record", "--native", "--format", "raw", "--rate", "250",
                              "--duration", str(max(1, round(seconds) - 1)), "--pid", str(pid),
                              "-o", f"{profile}-{pid}{tag}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in workers]


async def wait_listening(port: int, proc: subprocess.Popen, log: str) -> None:
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
    raise RuntimeError(f"the server did not start (exit {proc.poll()}): {tail}")
