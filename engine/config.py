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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine.errors import ConfigError

ENV_PREFIX = "SECKILL_"
CONFIG_ENV = "SECKILL_CONFIG"
JWT_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA", "HS256"})


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


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
                          default="redis://127.0.0.1:6379/0")
    amqp_url: str = _doc("RabbitMQ URL (vhost in the path).",
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
                       default="postgresql://postgres@127.0.0.1:5432/postgres")
    key_prefix: str = _doc("Prefix of every Redis key; isolates tests and tenants.", default="")
    connect_timeout: float = _doc("Seconds to wait for a service to accept a connection.",
                                  default=5.0)
    redis_timeout: float = _doc("Seconds a Redis reply may take beyond a read's BLOCK time "
                                "before the connection is dropped as dead.", default=5.0)

    # -- engine ------------------------------------------------------------
    engine_id: str = _doc("Names this engine host's stream consumers `<engine_id>-<slot>`; "
                          "two hosts must never share one ('' = the hostname and the "
                          "kernel's boot ID: unique per machine and boot; set it in "
                          "containers that share a kernel and a hostname).", default="")
    workers: int = _doc("Worker processes of `seckill run` (0 = CPU count).", default=0)
    batch_size: int = _doc("Entries per stream read by XREADGROUP COUNT.", default=1000)
    block_ms: int = _doc("XREADGROUP BLOCK milliseconds when the streams are idle.",
                         default=200)
    max_inflight_batches: int = _doc("Batches a worker holds at once (bounds memory).",
                                     default=4)
    publish_timeout: float = _doc("Seconds to wait for a batch's publisher confirms.",
                                  default=10.0)
    db_timeout: float = _doc("Seconds a batch's database transaction may take.", default=10.0)
    max_entry_bytes: int = _doc("Largest stream entry accepted; bigger ones are dead-lettered.",
                                default=4096)
    claim_idle_ms: int = _doc("Idle time after which the janitor reclaims an entry.",
                              default=60_000)
    max_deliveries: int = _doc("Deliveries after which an entry is dead-lettered.", default=5)
    janitor_interval: float = _doc("Seconds between janitor passes.", default=5.0)
    discovery_interval: float = _doc("Seconds between checks for newly opened sales.",
                                     default=0.5)
    product_cache_ttl: float = _doc("Seconds a product row stays in a worker's cache.",
                                    default=30.0)
    retry_backoff_max: float = _doc("Longest pause between reconnection attempts.", default=5.0)
    node_lease_ttl_ms: int = _doc("TTL of a worker's snowflake node-ID lease.", default=10_000)
    max_clock_rollback_ms: int = _doc("Clock rollback waited out before IDs fail.", default=2_000)

    # -- supervisor --------------------------------------------------------
    heartbeat_timeout: float = _doc("Seconds of worker silence before it is killed.",
                                    default=30.0)
    graceful_timeout: float = _doc("Seconds workers get to drain on SIGTERM.", default=30.0)
    boot_timeout: float = _doc("Seconds a worker may take to connect to every service.",
                               default=30.0)
    max_boot_failures: int = _doc("Consecutive boot failures that stop the supervisor.",
                                  default=3)
    metrics_host: str = _doc("Address of the supervisor's /metrics and /healthz.",
                             default="127.0.0.1")
    metrics_port: int = _doc("Port of the supervisor's /metrics (0 = disabled).", default=9108)
    metrics_dir: str = _doc("prometheus multiprocess directory ('' = a private temp dir).",
                            default="")
    pid_file: str = _doc("Where the supervisor writes its PID ('' = nowhere).", default="")

    # -- HTTP gate -----------------------------------------------------------
    bff_host: str = _doc("Address the HTTP gate listens on.", default="127.0.0.1")
    bff_port: int = _doc("Port of the HTTP gate.", default=8080)
    bff_workers: int = _doc("HTTP gate worker processes (0 = CPU count).", default=0)
    bff_max_inflight: int = _doc("In-flight requests per process before 429 (0 = no cap).",
                                 default=0)
    gate_min_replicas: int = _doc("Replicas every Redis master must have, and require of each "
                                  "write (its min-replicas-to-write), before the BFF starts: "
                                  "an accepted order is then on a replica, bar the last "
                                  "min-replicas-max-lag seconds (0 = not checked).", default=0)
    gate_wait_replicas: int = _doc("Replicas that must acknowledge an accepted purchase (WAIT on "
                                   "the master that took it) before the BFF answers 202; fewer "
                                   "within gate_wait_ms is a 503 'unreplicated' (the order is "
                                   "recorded, not yet safe from a failover; 0 = no WAIT).",
                                   default=0)
    gate_wait_ms: int = _doc("Milliseconds WAIT gives the replicas (gate_wait_replicas) "
                             "before the purchase is answered 503 'unreplicated'.", default=50)
    bff_soldout_recheck: float = _doc("Seconds a sold-out answer is cached per process.",
                                      default=0.5)
    bff_interface: str = _doc("How Granian calls the BFF: 'rsgi' (its own interface: one call "
                              "answers a request) or 'asgi' (as any ASGI server would).",
                              default="rsgi")
    bff_auth: str = _doc("'jwt' (a verified bearer token names the buyer) or 'none' (the body's "
                         "user_id does: demos and tests only; logged as a warning).",
                         default="jwt")
    bff_jwks: str = _doc("JWKS of the token issuer: a file path or an http(s) URL ('' = none: "
                         "the BFF refuses to start unless bff_auth = 'none').", default="")
    bff_jwt_algorithms: str = _doc("Accepted signature algorithms, comma-separated, of RS256, "
                                   "ES256, EdDSA and HS256 (HS256 only when listed here).",
                                   default="RS256,ES256,EdDSA")
    bff_jwt_issuer: str = _doc("Required `iss` of every token.", default="seckill-dev")
    bff_jwt_audience: str = _doc("Required `aud` of every token.", default="seckill-gate")
    bff_jwks_refresh: float = _doc("Seconds between background refreshes of a JWKS URL.",
                                   default=300.0)
    bff_jwks_min_refresh: float = _doc("Least seconds between two refreshes caused by a token "
                                       "with an unknown kid.", default=10.0)
    bff_token_cache: int = _doc("Verified tokens remembered per process (0 = verify each time).",
                                default=100_000)
    bff_user_rate: float = _doc("Purchase attempts per second one user may make on a product "
                                "(0 = no limit; `sale open --user-rate` overrides).",
                                default=2.0)
    bff_user_burst: int = _doc("Attempts one user may make at once before the rate applies.",
                               default=5)
    bff_ip_rate: float = _doc("Purchase attempts per second from one client IP on a product "
                              "(0 = no limit; `sale open --ip-rate` overrides).", default=0.0)
    bff_ip_burst: int = _doc("Attempts one client IP may make at once.", default=100)
    bff_trusted_proxies: str = _doc("Comma-separated addresses or CIDRs of proxies whose "
                                    "X-Forwarded-For names the client ('' = trust none).",
                                    default="")
    bff_body_timeout: float = _doc("Seconds a client has to send a purchase's body (408 "
                                   "after; it holds no in-flight slot meanwhile).", default=5.0)
    bff_header_timeout: float = _doc("Seconds a client has to send its request headers.",
                                     default=5.0)
    bff_keep_alive: bool = _doc("Keep HTTP/1.1 connections open between requests.",
                                default=True)
    bff_max_buffer: int = _doc("Largest HTTP/1 read buffer per connection in bytes (bounds "
                               "the request head).", default=65536)
    bff_order_timeout: float = _doc("Seconds an order lookup may wait for a database "
                                    "connection and its query (503 after).", default=2.0)
    bff_pg_dsn: str = _doc("PostgreSQL DSN of the BFF's order lookups ('' = pg_dsn as role "
                           "seckill_bff, without pg_dsn's password).", default="")
    bff_admin_port: int = _doc("Port of the BFF's /metrics, /openapi.json and /healthz, on "
                               "metrics_host (0 = disabled; the public port has no /metrics).",
                               default=9110)

    # -- resource domain -----------------------------------------------------
    rd_output_dir: str = _doc("Where the reference Resource Domain writes manifests, made "
                              "mode 0700 ('' = $XDG_STATE_HOME/seckill/manifests, or "
                              "~/.local/state/seckill/manifests).", default="")
    rd_pg_dsn: str = _doc("PostgreSQL DSN of the Resource Domain ('' = pg_dsn as role "
                          "seckill_resource_domain, without pg_dsn's password).", default="")
    rd_domain: str = _doc("DNS suffix of instance endpoints.", default="gpu.example.internal")
    rd_delay_ms: int = _doc("Simulated provisioning delay in milliseconds.", default=50)
    rd_failure_rate: float = _doc("Share of provisionings that fail (0..1).", default=0.0)
    rd_seed: int = _doc("Seed of the simulated failures (-1 = random).", default=-1)
    rd_prefetch: int = _doc("Unacknowledged events the Resource Domain holds.", default=200)
    rd_provisioner: str = _doc("How instances are provisioned: 'simulated' (manifests only) or "
                               "'kubectl' (apply them to the current cluster).",
                               default="simulated")
    rd_metrics_port: int = _doc("Port of the Resource Domain's /metrics, on metrics_host "
                                "(0 = disabled).", default=9109)
    status_batch_size: int = _doc("Status reports applied per database round trip.",
                                  default=500)
    status_unknown_retry: float = _doc("Seconds an update for an unknown instance is retried.",
                                       default=30.0)

    # -- logging -------------------------------------------------------------
    log_level: str = _doc("DEBUG, INFO, WARNING or ERROR.", default="INFO")
    log_json: bool = _doc("JSON log lines (true) or plain text (false).", default=True)

    def __post_init__(self) -> None:
        _validate(self)

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


_POSITIVE = {
    "batch_size", "block_ms", "max_inflight_batches", "max_entry_bytes", "claim_idle_ms",
    "max_deliveries", "node_lease_ttl_ms", "max_boot_failures", "status_batch_size",
    "rd_prefetch", "gate_wait_ms",
}
_NON_NEGATIVE = {
    "workers", "metrics_port", "bff_port", "bff_workers", "bff_max_inflight", "rd_delay_ms",
    "max_clock_rollback_ms", "bff_token_cache", "bff_admin_port",
    "gate_min_replicas", "gate_wait_replicas",
}
_AT_LEAST_ONE = {"bff_user_burst", "bff_ip_burst", "bff_max_buffer"}
_POSITIVE_FLOAT = {
    "connect_timeout", "redis_timeout", "publish_timeout", "db_timeout", "janitor_interval",
    "discovery_interval", "product_cache_ttl", "retry_backoff_max", "heartbeat_timeout",
    "graceful_timeout", "boot_timeout", "bff_soldout_recheck", "status_unknown_retry",
    "bff_jwks_refresh", "bff_jwks_min_refresh", "bff_body_timeout", "bff_header_timeout",
    "bff_order_timeout",
}
_SCHEMES = {
    "redis_url": ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"),
    "amqp_url": ("amqp", "amqps"),
    "pg_dsn": ("postgresql", "postgres"),
}


def _validate(s: Settings) -> None:
    for name in _POSITIVE:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: expected a positive integer, got {getattr(s, name)!r}")
    for name in _NON_NEGATIVE:
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(s, name)!r}")
    for name in _POSITIVE_FLOAT:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: expected a positive number, got {getattr(s, name)!r}")
    for name, schemes in _SCHEMES.items():
        scheme = urlsplit(getattr(s, name)).scheme
        if scheme not in schemes:
            raise ConfigError(
                f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)},"
                f" got {mask_url(getattr(s, name))!r}")
    if not 0.0 <= s.rd_failure_rate <= 1.0:
        raise ConfigError(f"rd_failure_rate: expected 0..1, got {s.rd_failure_rate!r}")
    if s.rd_provisioner not in ("simulated", "kubectl"):
        raise ConfigError(f"rd_provisioner: expected 'simulated' or 'kubectl', "
                          f"got {s.rd_provisioner!r}")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {s.log_level!r}")
    for name in _AT_LEAST_ONE:
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(s, name)!r}")
    for name in ("bff_user_rate", "bff_ip_rate"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: expected a number >= 0, got {getattr(s, name)!r}")
    if s.gate_wait_replicas and s.gate_wait_ms >= s.redis_socket_timeout() * 1000:
        raise ConfigError(f"gate_wait_ms: {s.gate_wait_ms} ms would outlast the Redis socket "
                          f"timeout ({s.redis_socket_timeout():g} s): lower it or raise "
                          f"redis_timeout")
    if s.bff_interface not in ("rsgi", "asgi"):
        raise ConfigError(f"bff_interface: expected 'rsgi' or 'asgi', got {s.bff_interface!r}")
    if s.bff_auth not in ("jwt", "none"):
        raise ConfigError(f"bff_auth: expected 'jwt' or 'none', got {s.bff_auth!r}")
    unknown = set(s.jwt_algorithms()) - JWT_ALGORITHMS
    if unknown or not s.jwt_algorithms():
        known = ", ".join(sorted(JWT_ALGORITHMS))
        raise ConfigError(f"bff_jwt_algorithms: expected some of {known}, "
                          f"got {s.bff_jwt_algorithms!r}")
    if s.max_deliveries < 2:
        raise ConfigError("max_deliveries: expected at least 2 (one retry)")


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
