"""Settings: defaults, TOML, environment, and errors that name the setting (pure logic)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from engine.config import Settings, describe, load_settings, mask_url
from engine.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "seckill.example.toml"


def test_defaults_follow_the_contract():
    s = load_settings(env={})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.pg_dsn == "postgresql://postgres@127.0.0.1:5432/postgres"


def test_example_file_lists_exactly_every_setting_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    flat = {k: v for section in data.values() for k, v in section.items()}
    assert set(flat) == {f.name for f in dataclasses.fields(Settings)}
    assert load_settings(EXAMPLE, env={}) == load_settings(env={})


def test_file_then_environment_then_overrides(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[engine]\nbatch_size = 100\nworkers = 3\n[services]\n'
                   'redis_url = "redis://10.0.0.1:6379/1"\n')
    s = load_settings(cfg, env={"SECKILL_BATCH_SIZE": "250", "SECKILL_LOG_JSON": "false"})
    assert (s.batch_size, s.workers, s.redis_url, s.log_json) == (
        250, 3, "redis://10.0.0.1:6379/1", False)
    assert load_settings(cfg, env={}, workers=9).workers == 9
    assert load_settings(env={"SECKILL_CONFIG": str(cfg)}).batch_size == 100


@pytest.mark.parametrize("env,message", [
    ({"SECKILL_BATCH_SIZE": "many"}, "SECKILL_BATCH_SIZE: expected an integer, got 'many'"),
    ({"SECKILL_BATCH_SIZE": "0"}, "batch_size: expected a positive integer"),
    ({"SECKILL_PUBLISH_TIMEOUT": "-1"}, "publish_timeout: expected a positive number"),
    ({"SECKILL_LOG_JSON": "maybe"}, "SECKILL_LOG_JSON: expected true or false"),
    ({"SECKILL_AMQP_URL": "http://u:pw@h/"}, "amqp_url: expected a URL starting with amqp://"),
    ({"SECKILL_RD_FAILURE_RATE": "2"}, "rd_failure_rate: expected 0..1"),
    ({"SECKILL_GATE_WAIT_REPLICAS": "1", "SECKILL_GATE_WAIT_MS": "60000"},
     "gate_wait_ms: 60000 ms would outlast the Redis socket timeout"),
    ({"SECKILL_GATE_WAIT_MS": "0"}, "gate_wait_ms: expected a positive integer"),
])
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert message in str(err.value)
    assert "pw" not in str(err.value)


def test_unknown_or_malformed_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_sise = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'batch_sise'"):
        load_settings(bad, env={})
    bad.write_text("batch_size = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize("url,masked", [
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
    ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
    ("postgresql://u:p%40ss@db/x?sslmode=require", "postgresql://u:***@db/x?sslmode=require"),
    ("postgresql://postgres@127.0.0.1:5432/postgres",
     "postgresql://postgres@127.0.0.1:5432/postgres"),
    # a password given as a query parameter (libpq accepts it there) is masked too
    ("postgresql://u@db/x?sslmode=require&password=hunter2&PWD=x",
     "postgresql://u@db/x?sslmode=require&password=***&PWD=***"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_every_setting_is_described():
    assert all(doc for _, doc, _ in describe())


def test_to_env_round_trips_for_child_processes():
    from engine.config import to_env

    s = load_settings(env={}).replace(redis_url="redis://:pw@h:1/2", log_json=False,
                                      batch_size=7, rd_failure_rate=0.25)
    env = to_env(s, base={"PATH": "/bin", "SECKILL_WORKERS": "99"}, workers=3)
    assert env["PATH"] == "/bin" and env["SECKILL_WORKERS"] == "3"
    assert load_settings(env=env) == s.replace(workers=3)


@pytest.mark.parametrize("change,message", [
    ({"workers": -1}, "workers: expected an integer >= 0, got -1"),
    ({"bff_user_rate": -0.5}, "bff_user_rate: expected a number >= 0, got -0.5"),
    ({"bff_ip_burst": 0}, "bff_ip_burst: expected an integer >= 1, got 0"),
    ({"connect_timeout": 0.0}, "connect_timeout: expected a positive number, got 0.0"),
    ({"max_deliveries": 0}, "max_deliveries: expected a positive integer, got 0"),
    ({"max_deliveries": 1}, "max_deliveries: expected at least 2 (one retry)"),
    ({"redis_url": "http://h/"}, "redis_url: expected a URL starting with redis:// or "
                                 "rediss:// or unix:// or redis+cluster:// or rediss+cluster://"),
    ({"pg_dsn": "mysql://u:pw@h/db"}, "pg_dsn: expected a URL starting with postgresql:// or "
                                      "postgres://, got 'mysql://u:***@h/db'"),
    ({"rd_provisioner": "helm"}, "rd_provisioner: expected 'simulated' or 'kubectl', "
                                 "got 'helm'"),
    ({"bff_interface": "wsgi"}, "bff_interface: expected 'rsgi' or 'asgi', got 'wsgi'"),
    ({"bff_auth": "basic"}, "bff_auth: expected 'jwt' or 'none', got 'basic'"),
    ({"log_level": "loud"}, "log_level: expected DEBUG, INFO, WARNING or ERROR, got 'loud'"),
    ({"bff_jwt_algorithms": "RS256,none"},
     "bff_jwt_algorithms: expected some of ES256, EdDSA, HS256, RS256, got 'RS256,none'"),
    ({"bff_jwt_algorithms": " , "}, "bff_jwt_algorithms: expected some of"),
])
def test_each_setting_checks_its_own_value(change, message):
    """Every kind of check, with the message it gives (the validators sit with the fields)."""
    with pytest.raises(ConfigError) as err:
        Settings(**change)
    assert message in str(err.value)
    assert "pw" not in str(err.value)


def test_checks_accept_the_edges():
    s = Settings(workers=0, bff_user_rate=0.0, bff_ip_burst=1, max_deliveries=2,
                 log_level="debug", rd_failure_rate=1.0, bff_jwt_algorithms=" HS256 ,",
                 redis_url="rediss+cluster://a:1,b:2/0")
    assert s.max_deliveries == 2
