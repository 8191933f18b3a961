"""The `seckill` command line, run as a user runs it, against the real services."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from engine.demo import ATTEMPTS, check, pace_line, tree_cpu_seconds
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.processes import SECKILL, engine_env
from engine.testing.waits import wait_for


def seckill(settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = engine_env(settings)
    environment.update(env)
    return subprocess.run([SECKILL, *args], capture_output=True, text=True, timeout=120,
                          env=environment)


def test_migrate_twice(settings):
    for _ in range(2):
        done = seckill(settings, "migrate")
        assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "resource.instance-created" in done.stdout


def test_product_add_sale_open_buy(settings, product_id):
    pid = str(product_id)
    added = seckill(settings, "product", "add", "--id", pid, "--name", "GPU 计算实例", "--cpus",
                    "8", "--memory-mb", "32768", "--gpu", "A100", "--image", "ubuntu:22.04")
    assert added.returncode == 0, added.stderr
    opened = seckill(settings, "sale", "open", "--product", pid, "--stock", "1")
    assert opened.returncode == 0 and opened.stdout.startswith("sale ")
    assert seckill(settings, "buy", "--product", pid, "--user", "5").stdout.startswith("accepted")
    assert seckill(settings, "buy", "--product", pid, "--user", "5").stdout.strip() == "duplicate"
    assert seckill(settings, "sale", "close", "--product", pid).returncode == 0
    assert seckill(settings, "buy", "--product", pid, "--user", "6").stdout.strip() == "no_sale"


def test_unknown_product_is_one_line_and_exit_2(settings):
    done = seckill(settings, "sale", "open", "--product", "424242424242", "--stock", "3")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "seckill: error: product 424242424242: no such product (add it with "
        "`seckill product add`)"]


def test_service_down_is_exit_3_with_the_password_masked(settings):
    done = seckill(settings, "buy", "--product", "1", "--user", "1",
                   SECKILL_REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    assert done.returncode == 3
    assert "hunter2" not in done.stderr and ":***@" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["sale", "open", "--product", "x", "--stock", "1"],
                                  ["sale", "open", "--product", "1"],
                                  ["product", "add", "--id", "0", "--name", "n", "--cpus", "1",
                                   "--memory-mb", "1", "--image", "i"],
                                  ["nonsense"]])
def test_bad_arguments_exit_2(settings, args):
    done = seckill(settings, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_bad_setting_is_exit_2(settings):
    done = seckill(settings, "migrate", SECKILL_BATCH_SIZE="lots")
    assert done.returncode == 2
    assert "SECKILL_BATCH_SIZE: expected an integer" in done.stderr


@pytest.mark.parametrize("args", [[], ["migrate"], ["product", "add"], ["sale", "open"],
                                  ["sale", "close"], ["buy"], ["run"]])
def test_every_command_has_help(settings, args):
    done = seckill(settings, *args, "--help")
    assert done.returncode == 0 and "usage: seckill" in done.stdout


def _one_line_exit_3(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
async def unmigrated_dsn(base_settings):
    """An empty database of this test's own: connections work, tables are missing."""
    name = f"seckill_unmigrated_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(base_settings.pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(base_settings.pg_dsn)._replace(path="/" + name))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def test_an_unmigrated_database_is_one_line_and_exit_3(settings, unmigrated_dsn):
    env = {"SECKILL_PG_DSN": unmigrated_dsn}
    done = seckill(settings, "product", "add", "--id", "7", "--name", "n", "--cpus", "1",
                   "--memory-mb", "1", "--image", "i", **env)
    line = _one_line_exit_3(done)
    assert line.startswith("seckill: error: PostgreSQL: relation \"products\" does not exist")
    assert "seckill migrate" in line
    done = seckill(settings, "sale", "open", "--product", "7", "--stock", "1", **env)
    assert "PostgreSQL" in _one_line_exit_3(done)


async def test_a_redis_error_reply_is_one_line_and_exit_3(settings, product_id):
    redis = Redis.from_url(settings.redis_url)
    try:
        keys = Keys(settings.key_prefix)
        await Gate(redis, keys).open_sale(product_id, 3)
        await redis.set(keys.buyers(product_id), "not a set")
    finally:
        await redis.aclose()
    done = seckill(settings, "buy", "--product", str(product_id), "--user", "5")
    assert _one_line_exit_3(done).startswith("seckill: error: Redis: WRONGTYPE")


def test_demo_with_a_service_down_is_one_line_and_exit_3(settings):
    env = engine_env(settings, pg_dsn="postgresql://postgres:hunter2@127.0.0.1:1/x")
    done = subprocess.run([sys.executable, "-m", "engine.demo"], capture_output=True,
                          text=True, timeout=120, env=env)
    line = _one_line_exit_3(done)
    assert line.startswith("seckill demo: error:") and "hunter2" not in line


def test_demo_runs_the_whole_flow(settings, fresh_queues):
    """The README's `make demo`, on this session's own prefix, database and vhost."""
    done = subprocess.run([sys.executable, "-m", "engine.demo"], capture_output=True,
                          text=True, timeout=240, env=engine_env(settings, rd_metrics_port=0))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invariants hold" in done.stdout and "RUNNING" in done.stdout
    assert "client-paced" in done.stdout and "make bench" in done.stdout


def test_demo_says_its_burst_is_client_paced():
    line = pace_line(10.0, 9.0, 0.5)
    assert line.startswith(f"client-paced: {ATTEMPTS} attempts in 10.00 s through one httpx")
    assert "the client 9.0 s, the HTTP gate 0.5 s (100 us an attempt)" in line
    assert "the HTTP gate" not in pace_line(10.0, 9.0, None)


async def test_demo_counts_the_cpu_of_a_process_and_its_children():
    # the BFF's CPU is its Granian workers': a parent that only waits for a child that
    # burns 0.5 s of CPU, then lives on (counted while running, not only once reaped)
    busy = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
            "\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               f"subprocess.run([sys.executable, '-c', {busy!r}])"],
                              start_new_session=True)

    async def counted() -> bool:
        return (tree_cpu_seconds(parent.pid) or 0.0) >= 0.45

    try:
        await wait_for(counted, 30, "the child's CPU counted in its parent's tree")
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)


def test_demo_invariants_allow_failed_units_sold_again():
    # 300 units; 20 orders failed and gave their units back; 5 of those were sold again
    assert check(305, [("FAILED", 20), ("RUNNING", 285)], stock_left=15)
    assert check(300, [("RUNNING", 300)], stock_left=0)
    assert not check(305, [("FAILED", 20), ("RUNNING", 284)], stock_left=15)  # a row missing
    assert not check(305, [("FAILED", 20), ("RUNNING", 285)], stock_left=16)  # a unit too many
    assert not check(301, [("RUNNING", 301)], stock_left=0)  # oversold


async def test_config_after_the_command(settings, product_id, tmp_path):
    redis = Redis.from_url(settings.redis_url)
    try:
        await Gate(redis, Keys(settings.key_prefix)).open_sale(product_id, 3)
    finally:
        await redis.aclose()
    config = tmp_path / "seckill.toml"
    config.write_text(f'redis_url = "{settings.redis_url}"\n'
                      f'key_prefix = "{settings.key_prefix}"\n')
    # only the file says where the sale is: no SECKILL_* variables at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECKILL_")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SECKILL, *args], capture_output=True, text=True, timeout=60,
                              env=env)

    pid = str(product_id)
    assert run("buy", "--product", pid, "--user", "5", "--config", str(config)) \
        .stdout.startswith("accepted")
    assert run("--config", str(config), "buy", "--product", pid, "--user", "5") \
        .stdout.strip() == "duplicate"
    # given twice, the one after the command wins
    done = run("--config", str(config), "buy", "--config", str(tmp_path / "missing.toml"),
               "--product", pid, "--user", "6")
    assert done.returncode == 2 and "missing.toml: not found" in done.stderr


def test_help_lists_every_exit_code():
    from engine import exits

    done = subprocess.run([SECKILL, "--help"], capture_output=True, text=True, timeout=30)
    listed = {int(m) for m in re.findall(r"^  (\d+) ", done.stdout, re.M)}
    codes = {v for k, v in vars(exits).items() if k.isupper() and isinstance(v, int)}
    assert codes == listed and exits.LEASE_LOST in listed


async def test_order_release_leaves_the_waitlist_or_asks_for_a_release(settings, product_id):
    from engine.pipeline.orderrows import prepare_connection, write_batch
    from engine.pipeline.orders import Order

    pid = str(product_id)
    seckill(settings, "product", "add", "--id", pid, "--name", "GPU", "--cpus", "8",
            "--memory-mb", "1024", "--image", "ubuntu:22.04")
    opened = seckill(settings, "sale", "open", "--product", pid, "--stock", "1",
                     "--waitlist-max", "5")
    assert opened.returncode == 0 and "waitlist of 5 at most" in opened.stdout
    redis = Redis.from_url(settings.redis_url)
    gate = Gate(redis, Keys(settings.key_prefix))
    try:
        bought = await gate.buy(product_id, 5)
        assert (await gate.join_waitlist(product_id, 6)).outcome == "joined"
        release = ("order", "release", "--product", pid, "--user")
        assert seckill(settings, *release, "6").stdout.strip() == "LEFT"
        gone = seckill(settings, *release, "6")
        assert gone.returncode == 1 and "is not waiting" in gone.stderr
        early = seckill(settings, *release, "5")
        assert early.returncode == 1 and "release it after it runs" in early.stderr
        pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1,
                                         init=prepare_connection)
        try:
            sale = (await gate.sale_state(product_id)).sale_id
            await write_batch(pool, [Order(product_id, 5, bought.stream_id, 1, sale,
                                           bought.slot, b"s", product_id * 10)], 10)
            await pool.execute("UPDATE seckill_logs SET status = 'RUNNING' "
                               "WHERE instance_id = $1", product_id * 10)
        finally:
            await pool.close()
        for _ in range(2):  # the second asks for nothing more
            done = seckill(settings, *release, "5")
            assert (done.returncode, done.stdout.strip()) == (0, "RELEASING"), done.stderr
        assert await redis.xlen(Keys(settings.key_prefix).releases(product_id)) == 1
    finally:
        await redis.aclose()
