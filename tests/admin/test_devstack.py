"""devstack: use, start, install or print, one branch at a time.

The "use" and "start" branches run against the real machine (the running services,
a real redis-server on a port of its own); "install" and "print" swap in a recording
Host, so no test ever runs apt-get.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine.admin import devstack
from engine.admin.devstack import (
    POSTGRESQL,
    REDIS,
    SERVICES,
    Host,
    Service,
    bring_up,
    no_service_starts,
    start_command,
    trust_local_tcp,
)
from engine.testing.ports import free_port


def _untouchable() -> Host:
    def refuse(*_: object) -> bool:
        raise AssertionError("a service that answers must be used, not started")
    return Host(installed=refuse, can_install=refuse, install=refuse, start=refuse)


class Machine:
    """A recording Host and a prober: the service comes up once it has been started."""

    def __init__(self, *, installed: bool, can_install: bool) -> None:
        self.installed, self.can_install = installed, can_install
        self.calls: list[tuple[str, object]] = []
        self.up = False

    async def probe(self, service: Service, settings: object) -> str | None:
        return None if self.up else "connection refused"

    def host(self) -> Host:
        return Host(installed=lambda s: self.installed, can_install=lambda: self.can_install,
                    install=lambda s: self.calls.append(("install", s.name)), start=self._start)

    def _start(self, service: Service, cmd: list[str]) -> None:
        self.calls.append(("start", cmd))
        self.up = True


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
async def test_use_a_service_that_answers(base_settings, service):
    ok, line = await bring_up(service, base_settings, host=_untouchable())
    assert ok and line.startswith("ok") and "started" not in line


async def test_status_only_reports_a_service_that_is_down(base_settings):
    settings = base_settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    ok, line = await bring_up(REDIS, settings, start=False, host=_untouchable())
    assert not ok and line.startswith("DOWN")


async def test_start_an_installed_redis_on_the_port_of_its_url(base_settings):
    port = free_port()
    settings = base_settings.replace(redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        ok, line = await bring_up(REDIS, settings)
        assert ok and line == f"ok       redis://127.0.0.1:{port}/0 (started)"
    finally:
        client = Redis(port=port)
        try:
            await client.shutdown(nosave=True)
        except RedisError:
            pass  # it closes the connection on its way out (or never started)
        await client.aclose()


async def test_install_then_start(base_settings):
    machine = Machine(installed=False, can_install=True)
    settings = base_settings.replace(redis_url="redis://localhost:6390/0")
    ok, line = await bring_up(REDIS, settings, prober=machine.probe, host=machine.host())
    assert ok and line.endswith("(installed and started)")
    assert machine.calls == [("install", "redis"), ("start", start_command(REDIS, settings))]


async def test_start_without_install(base_settings):
    machine = Machine(installed=True, can_install=False)
    ok, line = await bring_up(POSTGRESQL, base_settings, prober=machine.probe,
                              host=machine.host())
    assert ok and line.endswith("(started)") and [c for c, _ in machine.calls] == ["start"]


async def test_print_install_and_a_start_command_that_works(base_settings, monkeypatch,
                                                            tmp_path):
    monkeypatch.setattr(devstack, "PG_ROOT", tmp_path / "no-postgresql")
    machine = Machine(installed=False, can_install=False)
    ok, line = await bring_up(POSTGRESQL, base_settings, prober=machine.probe,
                              host=machine.host())
    assert not ok and machine.calls == []
    assert "run as root: apt-get install -y postgresql && pg_ctlcluster " \
        '--skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start' \
        in line
    assert "  main" not in line


def test_redis_is_started_where_its_url_points(base_settings):
    cmd = start_command(REDIS, base_settings.replace(redis_url="redis://localhost:6390/2"))
    assert cmd[cmd.index("--port") + 1] == "6390"
    assert cmd[cmd.index("--bind") + 1:cmd.index("--port")] == ["127.0.0.1", "-::1"]
    cmd = start_command(REDIS, base_settings.replace(redis_url="redis://[::1]:7001/0"))
    assert cmd[cmd.index("--bind") + 1:cmd.index("--port") + 2] == ["::1", "--port", "7001"]


def test_pg_version_is_the_newest_by_number(tmp_path):
    for v in ("9.6", "15", "13"):
        (tmp_path / v).mkdir()
    assert devstack.pg_version(tmp_path) == "15"
    assert devstack.pg_version(tmp_path / "missing") == ""


@pytest.mark.parametrize(("status", "reloaded"), [(0, True), (3, False)])
def test_trust_local_tcp_reloads_a_running_server_once(tmp_path, status, reloaded):
    hba = tmp_path / "15" / "main" / "pg_hba.conf"
    hba.parent.mkdir(parents=True)
    hba.write_text("local all postgres peer\n")
    ran: list[list[str]] = []

    def run(cmd: list[str]) -> int:
        ran.append(cmd)
        return status if cmd[-1] == "status" else 0

    assert trust_local_tcp(tmp_path, run) == ["15"]
    text = hba.read_text()
    assert text.index("host all all 127.0.0.1/32 trust") < text.index("local all postgres")
    assert [c[-1] for c in ran] == (["status", "reload"] if reloaded else ["status"])
    assert all(c[2:4] == ["15", "main"] for c in ran)
    ran.clear()
    assert trust_local_tcp(tmp_path, run) == [] and ran == [] and hba.read_text() == text


def test_no_service_starts_during_install_and_leaves_no_trace(tmp_path):
    policy = tmp_path / "policy-rc.d"
    with no_service_starts(policy):
        assert policy.read_text().rstrip().endswith("exit 101")
        assert os.stat(policy).st_mode & stat.S_IXUSR
    assert not policy.exists()


def test_an_existing_policy_is_left_alone(tmp_path):
    policy: Path = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    with no_service_starts(policy):
        pass
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
