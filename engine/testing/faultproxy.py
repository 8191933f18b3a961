"""A TCP fault proxy of our own for the tests and the chaos suite (no toxiproxy here).

It listens on a port and forwards every connection to one upstream (Redis, RabbitMQ
or PostgreSQL); a client pointed at it sees the network faults it is told to inflict:

- `cut()`: every open connection is reset at once (SO_LINGER 0, so both peers get an
  RST, not a polite FIN): a link that died under the client;
- `blackhole()`: nothing moves either way; open connections stay half-open and new
  ones are accepted and held, so only the client's own timeouts can find out;
- `set_latency(s)`: every chunk is delivered `s` seconds after it arrived, each way;
- `set_bandwidth(b)`: each direction carries at most `b` bytes a second;
- `heal()`: every fault off. Bytes held by a blackhole then flow, as TCP delivers what
  a partition held once it heals; a cut is instant and leaves nothing to heal.

The engine runs in subprocesses, so the proxy can too: `python -m engine.testing.faultproxy
--upstream HOST:PORT --control HOST:PORT` prints one JSON line with its ports, then takes
one command a line on its control port (`cut`, `blackhole`, `latency 0.2`,
`bandwidth 100000`, `heal`, `status`) and answers each with one JSON line.
`ProxyProcess` and `control()` drive it from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine.errors import HarnessError

CHUNK = 65536
QUEUED_CHUNKS = 64  # per direction: beyond this a delayed direction stops reading
PACE_STEP = 0.05  # a bandwidth limit is paced in pieces of this many seconds' worth

Address = tuple[str, int]


class ControlError(HarnessError):
    """A control command the proxy did not understand or could not carry out."""


@dataclass
class Faults:
    """What the proxy does to the traffic right now."""

    blackholed: bool = False
    latency: float = 0.0  # seconds added each way
    bandwidth: int = 0  # bytes a second each way; 0 = unlimited


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = asyncio.current_task()

    def reset(self) -> None:
        """Close both sockets with an RST: SO_LINGER 0, then close without flushing."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()


class FaultProxy:
    """Forwards `listen` to `upstream`, with the faults of `self.faults`."""

    def __init__(self, upstream: Address, listen: Address = ("127.0.0.1", 0), *,
                 control: Address | None = None) -> None:
        self.upstream = upstream
        self.listen = listen
        self.control_address = control
        self.faults = Faults()
        self.accepted = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._servers: list[asyncio.Server] = []

    # -- life ---------------------------------------------------------------
    async def start(self) -> FaultProxy:
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = await asyncio.start_server(self._on_client, *self.listen)
        self._servers.append(server)
        self.listen = server.sockets[0].getsockname()[:2]
        if self.control_address is not None:
            control = await asyncio.start_server(self._on_control, *self.control_address)
            self._servers.append(control)
            self.control_address = control.sockets[0].getsockname()[:2]
        return self

    @property
    def port(self) -> int:
        return self.listen[1]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        tasks = [link.task for link in self._links if link.task is not None]
        self.cut()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults -------------------------------------------------------------
    def cut(self) -> int:
        """Reset every open connection; returns how many. New ones are forwarded."""
        links, self._links = list(self._links), set()
        for link in links:
            link.reset()
        self.resets += len(links)
        return len(links)

    def blackhole(self) -> None:
        self.faults.blackholed = True
        self._events().clear()

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ControlError(f"latency: expected seconds >= 0, got {seconds}")
        self.faults.latency = seconds

    def set_bandwidth(self, bytes_per_second: int) -> None:
        if bytes_per_second < 0:
            raise ControlError(f"bandwidth: expected bytes/s >= 0, got {bytes_per_second}")
        self.faults.bandwidth = bytes_per_second

    def heal(self) -> None:
        self.faults = Faults()
        self._events().set()

    def status(self) -> dict[str, Any]:
        return {**asdict(self.faults), "port": self.port, "open": len(self._links),
                "accepted": self.accepted, "resets": self.resets,
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}"}

    def _events(self) -> asyncio.Event:
        if self._flowing is None:
            raise ControlError("the proxy is not started")
        return self._flowing

    # -- forwarding -----------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._events().wait()  # blackholed: accepted, never connected onward
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            await _first_to_end(self._pump(reader, link.upstream),
                                self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # the other side went away: so does this connection
        except asyncio.CancelledError:
            pass  # reset by cut() or close(): the sockets are gone already
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """One direction: read as it comes, deliver after the latency, at the bandwidth."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)
        reading = asyncio.create_task(self._read(source, queue))
        try:
            while (item := await queue.get()) is not None:
                arrived, data = item
                await self._deliver(sink, arrived, data)
            if sink.can_write_eof():
                sink.write_eof()  # the peer's half-close, passed on
        finally:
            reading.cancel()

    async def _read(self, source: asyncio.StreamReader,
                    queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._events().wait()  # blackholed: stop reading, let TCP hold the rest
            data = await source.read(CHUNK)
            await queue.put((loop.time(), data) if data else None)
            if not data:
                return

    async def _deliver(self, sink: asyncio.StreamWriter, arrived: float, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        flowing = self._events()
        while True:
            await flowing.wait()
            due = arrived + self.faults.latency
            if due <= loop.time():
                break
            await asyncio.sleep(due - loop.time())
        while data:
            await flowing.wait()  # a blackhole holds a chunk it has not sent yet, too
            rate = self.faults.bandwidth
            step = max(1, int(rate * PACE_STEP)) if rate else len(data)
            piece, data = data[:step], data[step:]
            sink.write(piece)
            await sink.drain()
            if rate:
                await asyncio.sleep(len(piece) / rate)

    # -- control --------------------------------------------------------------
    async def _on_control(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self.command(line.decode())).encode() + b"\n")
                await writer.drain()
        except (OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def command(self, line: str) -> dict[str, Any]:
        """Carry out one control command; the answer says whether it did and the status."""
        words = line.split()
        actions: dict[str, Callable[..., object]] = {
            "cut": self.cut, "blackhole": self.blackhole, "heal": self.heal,
            "latency": lambda s: self.set_latency(float(s)),
            "bandwidth": lambda b: self.set_bandwidth(int(b)),
            "status": lambda: None}
        try:
            if not words or words[0] not in actions:
                raise ControlError(f"unknown command {line.strip()!r}; expected one of "
                                   f"{', '.join(actions)}")
            result = actions[words[0]](*words[1:])
        except (ControlError, TypeError, ValueError) as exc:
            return {"ok": False, "error": str(exc), **self.status()}
        answer = {"ok": True, **self.status()}
        if words[0] == "cut":
            answer["cut"] = result
        return answer


async def _first_to_end(*directions: Awaitable[None]) -> None:
    """Run both directions; when one ends (EOF or an error), the connection is over."""
    tasks = [asyncio.ensure_future(d) for d in directions]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- driving a proxy from another process ------------------------------------------
def control(address: Address, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a proxy's control port; its JSON answer. Raises ControlError
    if the proxy refused the command."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(command.encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "no answer"))
    return answer


class ProxyProcess:
    """A fault proxy in a process of its own (`python -m engine.testing.faultproxy`)."""

    def __init__(self, upstream: Address, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "engine.testing.faultproxy",
               "--upstream", f"{upstream[0]}:{upstream[1]}",
               "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # one line once it listens (EOF if it died)
        if not line:
            self.proc.wait(timeout)
            raise ControlError(f"the fault proxy exited with {self.proc.returncode}")
        ready = json.loads(line)
        self.port: int = ready["port"]
        self.control_address: Address = ("127.0.0.1", ready["control"])

    def __call__(self, command: str) -> dict[str, Any]:
        return control(self.control_address, command)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def via(url: str, port: int, host: str = "127.0.0.1") -> str:
    """`url` (redis://, amqp://, postgresql://) with its host and port swapped for the
    proxy's, everything else (user, password, database, vhost, query) kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def upstream_of(url: str, default_port: int) -> Address:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(upstream: Address, listen: Address, control_at: Address) -> None:
    proxy = await FaultProxy(upstream, listen, control=control_at).start()
    assert proxy.control_address is not None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(json.dumps({"port": proxy.port, "control": proxy.control_address[1]}), flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.testing.faultproxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=_address, help="HOST:PORT to forward to")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--control", type=_address, default=("127.0.0.1", 0),
                        help="HOST:PORT of the control port (with --send: the proxy's)")
    parser.add_argument("--send", metavar="COMMAND",
                        help="send COMMAND to the proxy at --control and print its answer")
    args = parser.parse_args(argv)
    if args.send:
        print(json.dumps(control(args.control, args.send)))
        return 0
    if args.upstream is None:
        parser.error("--upstream is required to run a proxy")
    asyncio.run(_serve(args.upstream, args.listen, args.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
