"""`python -m engine.admin.devstack up|status`: Redis, RabbitMQ and PostgreSQL for development.

For each service: use it if its configured URL answers; else start the
installed server; else, as root on Debian, install it with apt-get and start
it; else say exactly what to run. Only servers on this machine are started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from engine.config import Settings, load_settings, mask_url
from engine.errors import ServiceUnavailable

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
PG_ROOT = Path("/etc/postgresql")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
HBA_MARK = "# seckill devstack: local TCP trusted"
# In a printed command, before PostgreSQL is installed: the version apt-get installs.
PG_VERSION_SHELL = '"$(ls /etc/postgresql | sort -V | tail -n 1)"'


@dataclass(frozen=True)
class Service:
    name: str
    package: str
    url_setting: str
    exe: str
    wait: float


REDIS = Service("redis", "redis-server", "redis_url", "redis-server", 20)
RABBITMQ = Service("rabbitmq", "rabbitmq-server", "amqp_url", "rabbitmq-server", 90)
POSTGRESQL = Service("postgresql", "postgresql", "pg_dsn", "pg_ctlcluster", 30)
SERVICES = [REDIS, RABBITMQ, POSTGRESQL]


async def probe(service: Service, settings: Settings) -> str | None:
    """None if the service answers at its configured URL, else why not."""
    from engine.connections import connect_amqp, connect_pg, connect_redis

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


# -- commands -----------------------------------------------------------------
def pg_version(root: Path | None = None) -> str:
    """The newest installed cluster version ("15"), or "" when PostgreSQL is not installed."""
    root = root or PG_ROOT
    if not root.is_dir():
        return ""
    versions = [d.name for d in root.iterdir() if d.name.replace(".", "").isdigit()]
    return max(versions, key=lambda v: [int(p) for p in v.split(".")], default="")


def pg_ctl(version: str, action: str) -> list[str]:
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]


def redis_bind(host: str) -> list[str]:
    """Loopback by name listens on both families (`-` makes ::1 optional), else the host."""
    return ["127.0.0.1", "-::1"] if host in ("", "localhost", "127.0.0.1") else [host]


def start_command(service: Service, settings: Settings) -> list[str]:
    """How to start the server so that it answers at the configured URL."""
    if service is REDIS:
        url = urlsplit(settings.redis_url)
        return ["redis-server", "--daemonize", "yes", "--bind", *redis_bind(url.hostname or ""),
                "--port", str(url.port or 6379), "--save", "", "--appendonly", "no",
                "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]
    if service is RABBITMQ:
        return ["rabbitmq-server", "-detached"]
    return pg_ctl(pg_version() or PG_VERSION_SHELL, "start")


def shell_text(cmd: list[str]) -> str:
    """A command as the user would type it; the PostgreSQL version lookup stays live."""
    return " ".join(part if part == PG_VERSION_SHELL else shlex.quote(part) for part in cmd)


def install_hint(service: Service, settings: Settings) -> str:
    hint = (f"apt-get install -y {service.package} && "
            f"{shell_text(start_command(service, settings))}")
    if service is POSTGRESQL:
        hint += (" (or as root `python -m engine.admin.devstack up`, which also trusts local TCP "
                 "so the password-less default DSN works)")
    return hint


# -- what bring_up does to the machine ----------------------------------------------
def installed(service: Service) -> bool:
    if service is POSTGRESQL and not pg_version():
        return False  # postgresql-common alone has pg_ctlcluster but no cluster to start
    return shutil.which(service.exe) is not None or os.path.exists(f"/usr/sbin/{service.exe}")


def can_install() -> bool:
    return os.geteuid() == 0 and os.path.exists("/etc/debian_version") and \
        shutil.which("apt-get") is not None


def _run(cmd: list[str], timeout: float = 600) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(cmd, check=True, timeout=timeout, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _returncode(cmd: list[str]) -> int:
    return subprocess.run(cmd, timeout=60, capture_output=True).returncode


@contextmanager
def no_service_starts(path: Path = POLICY_RC_D) -> Iterator[None]:
    """While packages install, forbid their own service starts (policy-rc.d exit 101).

    A package would start its server with its own configuration (Redis on 6379
    whatever the URL says, PostgreSQL before pg_hba.conf lets us in); we start
    each one ourselves, as CI machines run them. A policy already there stays.
    """
    if path.exists():
        yield
        return
    path.write_text("#!/bin/sh\n# seckill devstack: no service starts during its apt-get "
                    "install\nexit 101\n")
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


_apt_updated = False


def install(service: Service) -> None:
    global _apt_updated
    if not _apt_updated:
        _run(["apt-get", "update", "-q"])
        _apt_updated = True
    with no_service_starts():
        _run(["apt-get", "install", "-y", "-q", service.package])
    if service is POSTGRESQL:
        trust_local_tcp()


def trust_local_tcp(root: Path | None = None,
                    run: Callable[[list[str]], int] = _returncode) -> list[str]:
    """Let the configured user in over TCP without a password, as the defaults expect.

    Returns the cluster versions edited. A running server reads pg_hba.conf only
    on reload (a stopped one reads it when it starts).
    """
    edited = []
    for hba in sorted((root or PG_ROOT).glob("*/main/pg_hba.conf")):
        text = hba.read_text()
        if HBA_MARK in text:
            continue
        hba.write_text(f"{HBA_MARK}\nhost all all 127.0.0.1/32 trust\n"
                       "host all all ::1/128 trust\n" + text)
        edited.append(hba.parent.parent.name)
    for version in edited:
        if run(pg_ctl(version, "status")) == 0:
            run(pg_ctl(version, "reload"))
    return edited


def prepare_dirs(service: Service) -> None:
    if service is REDIS:
        for d in ("/var/lib/redis", "/var/log/redis"):
            os.makedirs(d, exist_ok=True)


def start_server(service: Service, cmd: list[str]) -> None:
    prepare_dirs(service)
    subprocess.run(cmd, timeout=120, capture_output=True)


@dataclass(frozen=True)
class Host:
    """The steps of bring_up that change the machine; tests swap in a recording one."""

    installed: Callable[[Service], bool] = installed
    can_install: Callable[[], bool] = can_install
    install: Callable[[Service], None] = install
    start: Callable[[Service, list[str]], None] = start_server


# -- bringing one service up -----------------------------------------------------------
def is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOCAL_HOSTS


Prober = Callable[[Service, Settings], Awaitable[str | None]]


async def wait_up(service: Service, settings: Settings, prober: Prober = probe) -> str | None:
    deadline = time.monotonic() + service.wait
    why = await prober(service, settings)
    while why is not None and time.monotonic() < deadline:
        print(".", end="", flush=True)
        await asyncio.sleep(1)
        why = await prober(service, settings)
    return why


async def bring_up(service: Service, settings: Settings, *, start: bool = True,
                   prober: Prober = probe, host: Host | None = None) -> tuple[bool, str]:
    """(ok, one-line status) for one service: use, start, install and start, or say how."""
    host = host or Host()
    url = getattr(settings, service.url_setting)
    if await prober(service, settings) is None:
        return True, f"ok       {mask_url(url)}"
    if not start:
        return False, f"DOWN     {mask_url(url)}"
    if not is_local(url):
        return False, f"DOWN     {mask_url(url)} (not local: start it where it runs)"
    there = host.installed(service)
    if not there and not host.can_install():
        return False, f"DOWN     not installed; run as root: {install_hint(service, settings)}"
    return await _start(service, settings, install=not there, prober=prober, host=host)


async def _start(service: Service, settings: Settings, *, install: bool, prober: Prober,
                 host: Host) -> tuple[bool, str]:
    try:
        if install:
            print(f"{service.name:<11} installing {service.package} ...", flush=True)
            host.install(service)
        cmd = start_command(service, settings)  # after installing: PostgreSQL's version
        host.start(service, cmd)
    except (subprocess.SubprocessError, OSError) as exc:
        return False, (f"DOWN     could not start ({exc}); run: "
                       f"{shell_text(start_command(service, settings))}")
    print(f"{service.name:<11} waiting ", end="", flush=True)
    why = await wait_up(service, settings, prober)
    print()
    if why is not None:
        return False, f"DOWN     {why}; run: {shell_text(cmd)}"
    how = "installed and started" if install else "started"
    return True, f"ok       {mask_url(getattr(settings, service.url_setting))} ({how})"


async def main_async(action: str, settings: Settings) -> int:
    ok_all = True
    for service in SERVICES:
        ok, line = await bring_up(service, settings, start=action == "up")
        ok_all &= ok
        print(f"{service.name:<11} {line}", flush=True)
    return 0 if ok_all else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.admin.devstack", description=__doc__)
    parser.add_argument("action", choices=("up", "status"))
    parser.add_argument("--config", help="TOML settings file")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.action, load_settings(args.config)))


if __name__ == "__main__":
    sys.exit(main())
