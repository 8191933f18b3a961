"""Every setting, declared once: defaults, then a TOML file, then `SECKILL_*`.

The environment wins over the file so an operator can override one value on
a host without editing the shared file. A bad value names the setting and
what was expected, because "invalid literal for int()" tells an on-call
engineer nothing at 3 a.m.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine.errors import ConfigError

ENV_PREFIX = "SECKILL_"
CONFIG_ENV = "SECKILL_CONFIG"
JWT_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA", "HS256"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


Check = Callable[[str, Any, str], None]
"""A setting's validator: (name, value, declared type) -> None, or ConfigError."""


def _doc(text: str, *, check: Check | tuple[Check, ...] = (), **kw: Any) -> Any:
    """A setting: its help text, its default and the checks its value must pass."""
    checks = check if isinstance(check, tuple) else (check,)
    return field(metadata={"doc": text, "checks": checks}, **kw)


def _noun(kind: str) -> tuple[str, str]:
    return ("an", "integer") if kind in (int, "int") else ("a", "number")


def _fail(name: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{name}: expected {expected}, got {got!r}")


def positive(name: str, value: Any, kind: str) -> None:
    if value <= 0:
        raise _fail(name, f"a positive {_noun(kind)[1]}", value)


def at_least(least: int) -> Check:
    def check(name: str, value: Any, kind: str) -> None:
        if value < least:
            article, noun = _noun(kind)
            raise _fail(name, f"{article} {noun} >= {least}", value)
    return check


non_negative = at_least(0)


def fraction(name: str, value: Any, kind: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise _fail(name, "0..1", value)


def _either(choices: Iterable[str]) -> str:
    *most, last = choices
    return f"{', '.join(most)} or {last}" if most else last


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any, kind: str) -> None:
        if value not in choices:
            raise _fail(name, _either(repr(c) for c in choices), value)
    return check


def level_name(name: str, value: Any, kind: str) -> None:
    """Any case: `info` is what people type."""
    if value.upper() not in LOG_LEVELS:
        raise _fail(name, _either(LOG_LEVELS), value)


def some_of(choices: frozenset[str]) -> Check:
    """A comma-separated list, not empty, of known names."""
    def check(name: str, value: Any, kind: str) -> None:
        given = {item.strip() for item in value.split(",") if item.strip()}
        if not given or given - choices:
            raise _fail(name, f"some of {', '.join(sorted(choices))}", value)
    return check


def url_with_schemes(*schemes: str) -> Check:
    def check(name: str, value: Any, kind: str) -> None:
        if urlsplit(value).scheme not in schemes:
            raise _fail(name, f"a URL starting with {' or '.join(s + '://' for s in schemes)}",
                        mask_url(value))
    return check


def blank_or(check: Check) -> Check:
    """`check`, unless the value is '' (the setting's "not set")."""
    def either(name: str, value: Any, kind: str) -> None:
        if value != "":
            check(name, value, kind)
    return either


def retried(name: str, value: Any, kind: str) -> None:
    """One delivery is no retry: an entry would be dead-lettered on its first failure."""
    if value < 2:
        raise ConfigError(f"{name}: expected at least 2 (one retry)")


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def default_engine_id() -> str:
    """`<hostname>-<boot>`: the same for every process of this host until it reboots (a
    restarted supervisor finds its predecessor's pending entries under the same consumer
    names at once), different on another machine even when the hostnames are equal."""
    try:
        boot = BOOT_ID.read_text().strip().replace("-", "")[:8]
    except OSError:
        boot = f"{uuid.getnode():012x}"[-8:]  # no /proc: the MAC address
    return f"{socket.gethostname()}-{boot}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Connection and tuning settings of every seckill process."""

    # -- services ---------------------------------------------------------
    redis_url: str = _doc("Redis URL of the gate and the order streams; a Redis Cluster is "
                          "redis+cluster://host:port,host:port/0 (any of its masters).",
                          check=url_with_schemes("redis", "rediss", "unix", "redis+cluster",
                                                 "rediss+cluster"),
                          default="redis://127.0.0.1:6379/0")
    amqp_url: str = _doc("RabbitMQ URL (vhost in the path).",
                         check=url_with_schemes("amqp", "amqps"),
                         default="amqp://guest:guest@127.0.0.1:5672/")
    amqp_engine_user: str = _doc("The engine's broker user: writes instance.created, reads "
                                 "the status queue (made by `seckill migrate`; it logs in "
                                 "to amqp_url's brokers and vhost).", default="seckill_engine")
    amqp_rd_user: str = _doc("The Resource Domain's broker user: reads its queue, writes "
                             "instance.status (made by `seckill migrate`).",
                             default="seckill_resource_domain")
    amqp_secrets_dir: str = _doc("Directory of the broker users' passwords, one file per user "
                                 "named for it (mode 0600; `seckill migrate` writes a missing "
                                 "one; '' = $XDG_STATE_HOME/seckill/amqp, or "
                                 "~/.local/state/seckill/amqp).", default="")
    amqp_admin_command: str = _doc("rabbitmqctl command `seckill migrate` runs to create the "
                                   "broker users, e.g. 'rabbitmqctl -n rabbit@mq1' (passwords "
                                   "go on its stdin, never its command line).",
                                   default="rabbitmqctl")
    pg_dsn: str = _doc("PostgreSQL DSN of seckill_logs and products.",
                       check=url_with_schemes("postgresql", "postgres"),
                       default="postgresql://postgres@127.0.0.1:5432/postgres")
    key_prefix: str = _doc("Prefix of every Redis key; isolates tests and tenants.", default="")
    connect_timeout: float = _doc("Seconds to wait for a service to accept a connection.",
                                  check=positive, default=5.0)
    redis_timeout: float = _doc("Seconds a Redis reply may take beyond a read's BLOCK time "
                                "before the connection is dropped as dead.",
                                check=positive, default=5.0)

    # -- engine ------------------------------------------------------------
    engine_id: str = _doc("Names this engine host's stream consumers `<engine_id>-<slot>`; "
                          "two hosts must never share one ('' = the hostname and the "
                          "kernel's boot ID: unique per machine and boot; set it in "
                          "containers that share a kernel and a hostname).", default="")
    workers: int = _doc("Worker processes of `seckill run` (0 = CPU count).",
                        check=non_negative, default=0)
    batch_size: int = _doc("Entries per stream read by XREADGROUP COUNT.",
                           check=positive, default=1000)
    block_ms: int = _doc("XREADGROUP BLOCK milliseconds when the streams are idle.",
                         check=positive, default=200)
    max_inflight_batches: int = _doc("Batches a worker holds at once (bounds memory).",
                                     check=positive, default=4)
    publish_timeout: float = _doc("Seconds to wait for a batch's publisher confirms.",
                                  check=positive, default=10.0)
    db_timeout: float = _doc("Seconds a batch's database transaction may take.",
                             check=positive, default=10.0)
    max_entry_bytes: int = _doc("Largest stream entry accepted; bigger ones are dead-lettered.",
                                check=positive, default=4096)
    claim_idle_ms: int = _doc("Idle time after which the janitor reclaims an entry.",
                              check=positive, default=60_000)
    max_deliveries: int = _doc("Deliveries after which an entry is dead-lettered.",
                               check=(positive, retried), default=5)
    janitor_interval: float = _doc("Seconds between janitor passes.",
                                   check=positive, default=5.0)
    discovery_interval: float = _doc("Seconds between checks for newly opened sales.",
                                     check=positive, default=0.5)
    product_cache_ttl: float = _doc("Seconds a product row stays in a worker's cache.",
                                    check=positive, default=30.0)
    retry_backoff_max: float = _doc("Longest pause between reconnection attempts.",
                                    check=positive, default=5.0)
    node_lease_ttl_ms: int = _doc("TTL of a worker's snowflake node-ID lease.",
                                  check=positive, default=10_000)
    max_clock_rollback_ms: int = _doc("Clock rollback waited out before IDs fail.",
                                      check=non_negative, default=2_000)

    # -- supervisor --------------------------------------------------------
    heartbeat_timeout: float = _doc("Seconds of worker silence before it is killed.",
                                    check=positive, default=30.0)
    graceful_timeout: float = _doc("Seconds workers get to drain on SIGTERM.",
                                   check=positive, default=30.0)
    boot_timeout: float = _doc("Seconds a worker may take to connect to every service.",
                               check=positive, default=30.0)
    max_boot_failures: int = _doc("Consecutive boot failures that stop the supervisor.",
                                  check=positive, default=3)
    metrics_host: str = _doc("Address of the supervisor's /metrics and /healthz.",
                             default="127.0.0.1")
    metrics_port: int = _doc("Port of the supervisor's /metrics (0 = disabled).",
                             check=non_negative, default=9108)
    metrics_dir: str = _doc("prometheus multiprocess directory ('' = a private temp dir).",
                            default="")
    pid_file: str = _doc("Where the supervisor writes its PID ('' = nowhere).", default="")

    # -- HTTP gate -----------------------------------------------------------
    bff_host: str = _doc("Address the HTTP gate listens on.", default="127.0.0.1")
    bff_port: int = _doc("Port of the HTTP gate.",
                         check=non_negative, default=8080)
    bff_workers: int = _doc("HTTP gate worker processes (0 = CPU count).",
                            check=non_negative, default=0)
    bff_max_inflight: int = _doc("In-flight requests per process before 429 (0 = no cap).",
                                 check=non_negative, default=0)
    gate_min_replicas: int = _doc("Replicas every Redis master must have, and require of each "
                                  "write (its min-replicas-to-write), before the BFF starts: "
                                  "an accepted order is then on a replica, bar the last "
                                  "min-replicas-max-lag seconds (0 = not checked).",
                                  check=non_negative, default=0)
    gate_wait_replicas: int = _doc("Replicas that must acknowledge an accepted purchase (WAIT on "
                                   "the master that took it) before the BFF answers 202; fewer "
                                   "within gate_wait_ms is a 503 'unreplicated' (the order is "
                                   "recorded, not yet safe from a failover; 0 = no WAIT).",
                                   check=non_negative, default=0)
    gate_wait_ms: int = _doc("Milliseconds WAIT gives the replicas (gate_wait_replicas) "
                             "before the purchase is answered 503 'unreplicated'.",
                             check=positive, default=50)
    bff_soldout_recheck: float = _doc("Seconds a sold-out answer is cached per process.",
                                      check=positive, default=0.5)
    bff_interface: str = _doc("How Granian calls the BFF: 'rsgi' (its own interface: one call "
                              "answers a request) or 'asgi' (as any ASGI server would).",
                              check=one_of("rsgi", "asgi"), default="rsgi")
    bff_auth: str = _doc("'jwt' (a verified bearer token names the buyer) or 'none' (the body's "
                         "user_id does: demos and tests only; logged as a warning).",
                         check=one_of("jwt", "none"), default="jwt")
    bff_jwks: str = _doc("JWKS of the token issuer: a file path or an http(s) URL ('' = none: "
                         "the BFF refuses to start unless bff_auth = 'none').", default="")
    bff_jwt_algorithms: str = _doc("Accepted signature algorithms, comma-separated, of RS256, "
                                   "ES256, EdDSA and HS256 (HS256 only when listed here).",
                                   check=some_of(JWT_ALGORITHMS), default="RS256,ES256,EdDSA")
    bff_jwt_issuer: str = _doc("Required `iss` of every token.", default="seckill-dev")
    bff_jwt_audience: str = _doc("Required `aud` of every token.", default="seckill-gate")
    bff_jwt_max_ttl: float = _doc("Longest lifetime in seconds a token may claim: exp - iat, or "
                                  "exp - now without iat (a longer one is refused).",
                                  check=positive, default=86400.0)
    bff_jwks_refresh: float = _doc("Seconds between background refreshes of a JWKS URL.",
                                   check=positive, default=300.0)
    bff_jwks_min_refresh: float = _doc("Least seconds between two refreshes caused by a token "
                                       "with an unknown kid.",
                                       check=positive, default=10.0)
    bff_token_cache: int = _doc("Verified tokens remembered per process (0 = verify each time).",
                                check=non_negative, default=100_000)
    bff_auth_failure_rate: float = _doc("Failed token checks per second one client IP may "
                                        "cause; past its burst, that IP's tokens not yet "
                                        "verified are refused 429 unchecked (0 = no limit).",
                                        check=non_negative, default=5.0)
    bff_auth_failure_burst: int = _doc("Failed token checks one client IP may cause at once.",
                                       check=at_least(1), default=50)
    bff_user_rate: float = _doc("Purchase attempts per second one user may make on a product "
                                "(0 = no limit; `sale open --user-rate` overrides).",
                                check=non_negative, default=2.0)
    bff_user_burst: int = _doc("Attempts one user may make at once before the rate applies.",
                               check=at_least(1), default=5)
    bff_ip_rate: float = _doc("Purchase attempts per second from one client IP on a product "
                              "(0 = no limit, the default: behind a proxy missing from "
                              "bff_trusted_proxies all buyers share its address, and NAT "
                              "puts many behind one; bff_user_rate limits by identity; "
                              "`sale open --ip-rate` overrides).",
                              check=non_negative, default=0.0)
    bff_ip_burst: int = _doc("Attempts one client IP may make at once.",
                             check=at_least(1), default=100)
    waitlist_max: int = _doc("Users a sold-out sale's waitlist takes at most; past it a "
                             "join is 410 full (`sale open --waitlist-max` overrides; "
                             "0 = no waitlist).",
                             check=non_negative, default=100_000)
    bff_trusted_proxies: str = _doc("Comma-separated addresses or CIDRs of proxies whose "
                                    "X-Forwarded-For names the client ('' = trust none).",
                                    default="")
    bff_body_timeout: float = _doc("Seconds a client has to send a purchase's body (408 "
                                   "after; it holds no in-flight slot meanwhile).",
                                   check=positive, default=5.0)
    bff_header_timeout: float = _doc("Seconds a client has to send its request headers.",
                                     check=positive, default=5.0)
    bff_keep_alive: bool = _doc("Keep HTTP/1.1 connections open between requests.",
                                default=True)
    bff_max_buffer: int = _doc("Largest HTTP/1 read buffer per connection in bytes (bounds "
                               "the request head).",
                               check=at_least(1), default=65536)
    bff_order_timeout: float = _doc("Seconds an order lookup may wait for a database "
                                    "connection and its query (503 after).",
                                    check=positive, default=2.0)
    bff_pg_dsn: str = _doc("PostgreSQL DSN of the BFF's order lookups ('' = pg_dsn as role "
                           "seckill_bff, without pg_dsn's password).", default="")
    bff_admin_port: int = _doc("Port of the BFF's /metrics, /openapi.json and /healthz, on "
                               "metrics_host (0 = disabled; the public port has no /metrics).",
                               check=non_negative, default=9110)

    # -- resource domain -----------------------------------------------------
    rd_output_dir: str = _doc("Where the reference Resource Domain writes manifests, made "
                              "mode 0700 ('' = $XDG_STATE_HOME/seckill/manifests, or "
                              "~/.local/state/seckill/manifests).", default="")
    rd_pg_dsn: str = _doc("PostgreSQL DSN of the Resource Domain ('' = pg_dsn as role "
                          "seckill_resource_domain, without pg_dsn's password).", default="")
    rd_domain: str = _doc("DNS suffix of instance endpoints.", default="gpu.example.internal")
    rd_delay_ms: int = _doc("Simulated provisioning delay in milliseconds.",
                            check=non_negative, default=50)
    rd_failure_rate: float = _doc("Share of provisionings that fail (0..1).",
                                  check=fraction, default=0.0)
    rd_seed: int = _doc("Seed of the simulated failures (-1 = random).", default=-1)
    rd_prefetch: int = _doc("Unacknowledged events the Resource Domain holds.",
                            check=positive, default=200)
    rd_provisioner: str = _doc("How instances are provisioned: 'simulated' (manifests only) or "
                               "'kubectl' (apply them to the current cluster).",
                               check=one_of("simulated", "kubectl"), default="simulated")
    rd_metrics_port: int = _doc("Port of the Resource Domain's /metrics, on metrics_host "
                                "(0 = disabled).", default=9109)
    status_batch_size: int = _doc("Status reports applied per database round trip.",
                                  check=positive, default=500)
    status_unknown_retry: float = _doc("Seconds an update for an unknown instance is retried.",
                                       check=positive, default=30.0)
    release_poll_interval: float = _doc("Seconds a worker waits between looks at the "
                                        "release signals (which products have new "
                                        "release requests) when idle.",
                                        check=positive, default=0.2)

    # -- logging -------------------------------------------------------------
    log_level: str = _doc("DEBUG, INFO, WARNING or ERROR.",
                          check=level_name, default="INFO")
    log_json: bool = _doc("JSON log lines (true) or plain text (false).", default=True)

    # -- tracing ---------------------------------------------------------------
    trace_sample: float = _doc("Share of purchase attempts the BFF traces (0..1; 0 = tracing "
                               "off in every process: no span, no exporter; the engine and "
                               "the Resource Domain follow an order's own sampling).",
                               check=fraction, default=0.0)
    trace_endpoint: str = _doc("OTLP/HTTP collector URL, spans go to its /v1/traces ('' = "
                               "OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318).",
                               check=blank_or(url_with_schemes("http", "https")), default="")
    trace_queue: int = _doc("Finished spans a process holds for export; past it spans are "
                            "dropped and counted (seckill_trace_spans_dropped_total), never "
                            "waited for.", check=positive, default=2048)

    def __post_init__(self) -> None:
        for f in fields(self):
            for check in f.metadata.get("checks", ()):
                check(f.name, getattr(self, f.name), f.type)
        _check_together(self)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redis_socket_timeout(self) -> float:
        """Socket timeout of every Redis client: above the longest XREADGROUP BLOCK, so
        only a dead server or network (not an idle stream) trips it."""
        return self.block_ms / 1000 + self.redis_timeout

    def bff_dsn(self) -> str:
        """The BFF's own login: SELECT on the order columns it shows, nothing more."""
        return self.bff_pg_dsn or role_dsn(self.pg_dsn, BFF_ROLE)

    def rd_dsn(self) -> str:
        """The Resource Domain's own login: its schema, never seckill_logs."""
        return self.rd_pg_dsn or role_dsn(self.pg_dsn, RD_ROLE)

    def jwt_algorithms(self) -> list[str]:
        """The configured algorithms; a token's own `alg` header never adds one."""
        return [a.strip() for a in self.bff_jwt_algorithms.split(",") if a.strip()]

    def effective_engine_id(self) -> str:
        return self.engine_id or default_engine_id()

    def effective_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def _check_together(s: Settings) -> None:
    """The checks that need two settings; each setting's own ran before."""
    if s.gate_wait_replicas and s.gate_wait_ms >= s.redis_socket_timeout() * 1000:
        raise ConfigError(f"gate_wait_ms: {s.gate_wait_ms} ms would outlast the Redis socket "
                          f"timeout ({s.redis_socket_timeout():g} s): lower it or raise "
                          f"redis_timeout")


BFF_ROLE = "seckill_bff"
RD_ROLE = "seckill_resource_domain"
ENGINE_ROLE = "seckill_engine"


def role_dsn(dsn: str, role: str) -> str:
    """`dsn` logging in as `role`: the user replaced, a password in it (netloc or query)
    dropped, since it belongs to the other user. Roles made by `seckill migrate`."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(item for item in parts.query.split("&")
                     if item and item.partition("=")[0].lower() not in SECRET_PARAMS)
    return urlunsplit(parts._replace(netloc=f"{role}@{hosts}", query=query))


SECRET_PARAMS = frozenset({"password", "passwd", "pass", "pwd", "secret", "token",
                           "sslpassword"})


def mask_url(url: str) -> str:
    """`scheme://user:***@host/...`: a URL with its password hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if parts.query:  # libpq and others also take `?password=...`
        parts = parts._replace(query="&".join(
            f"{k}=***" if k.lower() in SECRET_PARAMS else f"{k}={v}" if sep else k
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))))
    return urlunsplit(parts)


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Turn a TOML or environment value into the declared type of `name`."""
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind in (float, "float"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ValueError(raw)
        return str(raw)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}
        raise ConfigError(
            f"{name}: expected {expected.get(str(getattr(kind, '__name__', kind)), 'a string')},"
            f" got {raw!r}") from None


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults, then the TOML file (`path` or `$SECKILL_CONFIG`), then `SECKILL_*`,
    then explicit keyword overrides (command-line flags)."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(Settings)}
    if path:
        values.update(_read_toml(Path(path), known))
    for name, kind in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(ENV_PREFIX + name.upper(), kind, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def to_env(settings: Settings, base: Mapping[str, str] | None = None,
           **overrides: Any) -> dict[str, str]:
    """The environment of a child process that should load exactly these settings
    (plus `overrides`): `base` (default: ours) without its own SECKILL_* variables."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(ENV_PREFIX)}
    values = dataclasses.asdict(settings)
    values.update(overrides)
    for name, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


def _read_toml(path: Path, known: Mapping[str, Any]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # Sections ([engine], [bff], ...) are only for readability: keys are global.
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[key] = _coerce(key, known[key], value)
    return out


def describe() -> list[tuple[str, str, Any]]:
    """(name, doc, default) of every setting, for `--help` and the README."""
    return [(f.name, f.metadata.get("doc", ""), f.default) for f in fields(Settings)]
