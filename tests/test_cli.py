"""The `seckill` command line, run as a user runs it, against the real services."""

from __future__ import annotations

import subprocess

import pytest
from support import SECKILL, engine_env


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
