"""`python -m engine.devstack up|status`: Redis, RabbitMQ and PostgreSQL for development.

For each service: use it if its configured URL answers; else start the
installed server; else, as root on Debian, install it with apt-get and start
it; else say exactly what to run. Only servers on this machine are started.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config import Settings, load_settings, mask_url
from .errors import ServiceUnavailable

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


@dataclass(frozen=True)
class Service:
    name: str
    package: str
    url_setting: str
    start: list[str]
    wait: float


def pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return versions[-1] if versions else ""


SERVICES = [
    Service("redis", "redis-server", "redis_url",
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
             "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile",
             "/var/log/redis/ci.log"], 20),
    Service("rabbitmq", "rabbitmq-server", "amqp_url", ["rabbitmq-server", "-detached"], 90),
    Service("postgresql", "postgresql", "pg_dsn",
            ["pg_ctlcluster", "--skip-systemctl-redirect", "{version}", "main", "start"], 30),
]


async def probe(service: Service, settings: Settings) -> str | None:
    """None if the service answers at its configured URL, else why not."""
    from .connections import connect_amqp, connect_pg, connect_redis

    s = settings.replace(connect_timeout=3.0)
    try:
        if service.name == "redis":
            client = await connect_redis(s)
            await client.aclose()
        elif service.name == "rabbitmq":
            conn = await connect_amqp(s)
            await conn.close()
        else:
            pg = await connect_pg(s)
            await pg.close()
    except ServiceUnavailable as exc:
        return str(exc)
    return None


def start_command(service: Service) -> list[str]:
    return [part.replace("{version}", pg_version()) for part in service.start]


def installed(service: Service) -> bool:
    return shutil.which(start_command(service)[0]) is not None or \
        os.path.exists(f"/usr/sbin/{start_command(service)[0]}")


def can_install() -> bool:
    return os.geteuid() == 0 and os.path.exists("/etc/debian_version") and \
        shutil.which("apt-get") is not None


def _run(cmd: list[str], timeout: float = 600) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(cmd, check=True, timeout=timeout, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


_apt_updated = False


def install(service: Service) -> None:
    global _apt_updated
    if not _apt_updated:
        _run(["apt-get", "update", "-q"])
        _apt_updated = True
    # policy-rc.d: install only; we start servers ourselves, the way CI machines run them
    _run(["apt-get", "install", "-y", "-q", service.package])
    if service.name == "postgresql":
        trust_local_tcp()


def trust_local_tcp() -> None:
    """Let the configured user in over TCP without a password, as the defaults expect."""
    for hba in glob.glob("/etc/postgresql/*/main/pg_hba.conf"):
        text = Path(hba).read_text()
        if "seckill devstack" in text:
            continue
        Path(hba).write_text("# seckill devstack: local TCP trusted\n"
                             "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
                             + text)


def prepare_dirs(service: Service) -> None:
    if service.name == "redis":
        for d in ("/var/lib/redis", "/var/log/redis"):
            os.makedirs(d, exist_ok=True)


def is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOCAL_HOSTS


async def wait_up(service: Service, settings: Settings) -> str | None:
    deadline = time.monotonic() + service.wait
    why = await probe(service, settings)
    while why is not None and time.monotonic() < deadline:
        print(".", end="", flush=True)
        await asyncio.sleep(1)
        why = await probe(service, settings)
    return why


Prober = Callable[[Service, Settings], Awaitable[str | None]]


async def bring_up(service: Service, settings: Settings, *, start: bool = True,
                   prober: Prober = probe) -> tuple[bool, str]:
    """(ok, one-line status) for one service."""
    url = getattr(settings, service.url_setting)
    if await prober(service, settings) is None:
        return True, f"ok       {mask_url(url)}"
    if not start:
        return False, f"DOWN     {mask_url(url)}"
    if not is_local(url):
        return False, f"DOWN     {mask_url(url)} (not local: start it where it runs)"
    how = "started"
    try:
        if not installed(service):
            if not can_install():
                return False, (f"DOWN     not installed; run as root: apt-get install -y "
                               f"{service.package} && {' '.join(start_command(service))}")
            print(f"{service.name:<11} installing {service.package} ...", flush=True)
            install(service)
            how = "installed and started"
        prepare_dirs(service)
        subprocess.run(start_command(service), timeout=120, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        return False, f"DOWN     could not start ({exc}); run: {' '.join(start_command(service))}"
    print(f"{service.name:<11} waiting ", end="", flush=True)
    why = await wait_up(service, settings)
    print()
    if why is not None:
        return False, f"DOWN     {why}; run: {' '.join(start_command(service))}"
    return True, f"ok       {mask_url(url)} ({how})"


async def main_async(action: str, settings: Settings) -> int:
    ok_all = True
    for service in SERVICES:
        ok, line = await bring_up(service, settings, start=action == "up")
        ok_all &= ok
        print(f"{service.name:<11} {line}", flush=True)
    return 0 if ok_all else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.devstack", description=__doc__)
    parser.add_argument("action", choices=("up", "status"))
    parser.add_argument("--config", help="TOML settings file")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.action, load_settings(args.config)))


if __name__ == "__main__":
    sys.exit(main())
