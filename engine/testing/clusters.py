"""Local clusters for development and tests: a Redis Cluster and a RabbitMQ cluster.

Built from the single private instances of `engine.testing.nodes` (each node on
its own port and directory, never the shared services):

- `LocalRedisCluster`: 3 masters with one replica each (`--cluster-enabled`, joined
  by `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`), ready once
  every node reports `cluster_state:ok` and every master has its replica attached.
- `LocalRabbitCluster`: 3 RabbitMQ nodes sharing one Erlang cookie; the 2nd and 3rd
  join the 1st with `stop_app` / `join_cluster` / `start_app`.

`python -m engine.testing.clusters up|down|status` (`make cluster-up` /
`make cluster-down`) runs them on fixed ports (Redis 7001-7006, RabbitMQ 5681-5683,
distribution ports 25681-25683) in `STATE_DIR`, outliving the command; tests start
their own on free ports under `nodes.BASE`, reaped like any private node.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import socket
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Generic, Self, TypeVar

import redis

from engine.config import mask_url
from engine.testing import nodes as local_nodes
from engine.testing.nodes import LocalNode, LocalNodeFailed, RabbitNode, RedisNode, _run
from engine.testing.ports import HOST, free_port, port_open
from engine.testing.waits import wait_until

STATE_DIR = Path("/tmp/seckill-clusters")
REDIS_PORTS = tuple(range(7001, 7007))
RABBIT_PORTS = (5681, 5682, 5683)
RABBIT_DIST_OFFSET = 20000  # distribution port of the node on AMQP port p: p + 20000
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus port is always the client port + 10000
NODE_TIMEOUT_MS = 2000  # how long a master may be silent before its replica takes over


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free as well."""
    for _ in range(200):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and not port_open(port + CLUSTER_BUS_OFFSET):
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind((HOST, port + CLUSTER_BUS_OFFSET))
                return port
    raise LocalNodeFailed("no free port pair (port, port + 10000) for a Redis Cluster node")


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on `port` as a dict of its `name:value` lines."""
    raw = _client(port).execute_command("CLUSTER INFO")
    if isinstance(raw, dict):  # redis-py parses it already
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


N = TypeVar("N", bound=LocalNode)


class _LocalCluster(ABC, Generic[N]):
    """What every local cluster does with its nodes: stop, destroy, outlive its starter."""

    nodes: list[N]

    @abstractmethod
    def start(self) -> Self:
        """Start every node and form the cluster; return once it serves."""

    def _stop_order(self) -> list[N]:
        return list(self.nodes)

    def stop(self) -> None:
        for node in self._stop_order():
            node.stop()

    def destroy(self) -> None:
        for node in self._stop_order():
            node.destroy()

    def detach(self) -> None:
        """Leave the servers running when this process exits (`make cluster-up`)."""
        for node in self.nodes:
            local_nodes._live.discard(node)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class LocalRedisCluster(_LocalCluster[RedisNode]):
    """Masters and replicas of a local Redis Cluster; `start()` returns once it serves."""

    def __init__(self, ports: list[int] | None = None, base: Path | None = None, *,
                 masters: int = 3, replicas: int = 1) -> None:
        count = masters * (1 + replicas)
        self.ports = list(ports) if ports else [free_cluster_port() for _ in range(count)]
        if len(self.ports) != count:
            raise LocalNodeFailed(f"a cluster of {masters} masters with {replicas} replica(s) "
                                  f"each needs {count} ports, got {len(self.ports)}")
        self.masters = masters
        self.replicas = replicas
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "yes")
        self.nodes = [RedisNode(port, None if base is None else base / f"redis-{port}",
                                extra=extra) for port in self.ports]

    @property
    def url(self) -> str:
        """`redis+cluster://` with every master-to-be as a startup node."""
        hosts = ",".join(f"{HOST}:{p}" for p in self.ports[:self.masters])
        return f"redis+cluster://{hosts}/0"

    def start(self, timeout: float = 60.0) -> Self:
        for node in self.nodes:
            node.start()
        if not self.formed():
            self._create()
        wait_until(self.ready, timeout, f"{self} to report cluster_state:ok", interval=0.1,
                   error=LocalNodeFailed)
        return self

    def formed(self) -> bool:
        """Whether the nodes already know each other (a restart of a formed cluster)."""
        try:
            return int(cluster_info(self.ports[0])["cluster_known_nodes"]) > 1
        except (redis.RedisError, KeyError, ValueError):
            return False

    def _create(self) -> None:
        exe = shutil.which("redis-cli")
        if exe is None:
            raise LocalNodeFailed("redis-cli not found: apt-get install -y redis-tools")
        _run([exe, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
              "--cluster-replicas", str(self.replicas), "--cluster-yes"],
             timeout=60, what=f"{self}: redis-cli --cluster create")

    def ready(self) -> bool:
        """Every node says cluster_state:ok and every master has its replicas attached
        and synced (online)."""
        try:
            for port in self.ports:
                if cluster_info(port).get("cluster_state") != "ok":
                    return False
                info = _client(port).info("replication")
                online = [i for i in range(int(info.get("connected_slaves", 0)))
                          if info.get(f"slave{i}", {}).get("state") == "online"]
                # a replica still syncing (wait_bgsave behind the AOF's first rewrite)
                # acknowledges nothing: a WAIT would time out
                if info.get("role") == "master" and len(online) < self.replicas:
                    return False
        except (redis.RedisError, OSError):
            return False
        return True

    def master_of_slot(self, slot: int) -> RedisNode:
        """The node serving `slot` now (after a failover, the promoted replica)."""
        any_node = self.running()[0].port
        for start, end, master, *_ in _client(any_node).execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise LocalNodeFailed(f"{self}: no node serves slot {slot}")

    def node_id(self, node: RedisNode) -> str:
        raw = _client(node.port).execute_command("CLUSTER MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def serving(self) -> list[RedisNode]:
        """The nodes serving slots now."""
        ports = {int(master[1]) for _, _, master, *_ in
                 _client(self.running()[0].port).execute_command("CLUSTER SLOTS")}
        return [n for n in self.nodes if n.port in ports]

    def move_slot(self, slot: int, target: RedisNode, batch: int = 100) -> int:
        """Reshard one slot to `target` while clients use it (IMPORTING / MIGRATING, then
        MIGRATE its keys, then SETSLOT NODE on every master); returns the keys moved.
        Clients meanwhile get ASK for keys already moved and MOVED afterwards."""
        source = self.master_of_slot(slot)
        if source is target:
            return 0
        src, dst = _client(source.port), _client(target.port)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
            src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for node in self.serving():
            _client(node.port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved

    def kill_master_of(self, slot: int, timeout: float = 60.0) -> RedisNode:
        """SIGKILL the master of `slot` and wait until its replica serves the slot."""
        master = self.master_of_slot(slot)
        master.kill()
        self.wait_promoted(slot, master, timeout)
        return master

    def replicas_of(self, master: RedisNode) -> list[RedisNode]:
        """The running nodes replicating `master` now."""
        found = []
        for node in self.running():
            info = _client(node.port).info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                found.append(node)
        return found

    def wait_promoted(self, slot: int, master: RedisNode, timeout: float = 60.0) -> None:
        """Wait until a node other than `master` serves `slot` and the cluster is ok."""

        def promoted() -> bool:
            try:
                return self.master_of_slot(slot) is not master and all(
                    cluster_info(n.port).get("cluster_state") == "ok" for n in self.running())
            except (redis.RedisError, OSError, LocalNodeFailed):
                return False

        wait_until(promoted, timeout, f"a replica of {master} promoted", interval=0.1,
                   error=LocalNodeFailed)

    def running(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.running()]

    def __str__(self) -> str:
        return f"local Redis Cluster on ports {self.ports[0]}-{self.ports[-1]}"


class LocalRabbitCluster(_LocalCluster[RabbitNode]):
    """RabbitMQ nodes with one cookie, joined into one cluster behind the first."""

    def __init__(self, ports: list[int] | None = None, base: Path | None = None, *,
                 size: int = 3, dist_ports: list[int] | None = None) -> None:
        self.ports = list(ports) if ports else [free_port() for _ in range(size)]
        dists = dist_ports or [free_port() for _ in self.ports]
        cookie = self._cookie(base)
        self.nodes = [RabbitNode(port, None if base is None else base / f"rabbitmq-{port}",
                                 name=f"seckill-c{port}", dist_port=dist, cookie=cookie)
                      for port, dist in zip(self.ports, dists, strict=True)]

    @staticmethod
    def _cookie(base: Path | None) -> str:
        """One cookie for every node; kept in `base` so a restart finds the same one."""
        if base is None:
            return secrets.token_hex(16)
        path = base / "rabbitmq.cookie"
        if not path.exists():
            base.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(16))
        return path.read_text().strip()

    @property
    def url(self) -> str:
        """Every node, comma-separated: the engine fails over between them."""
        hosts = ",".join(f"{HOST}:{p}" for p in self.ports)
        return f"amqp://guest:guest@{hosts}/%2F"

    def start(self) -> Self:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.nodename not in self.members(node):
                node.stop_app()
                node.ctl("join_cluster", first.nodename)
                node.start_app()
        return self

    @staticmethod
    def members(node: RabbitNode) -> str:
        """The cluster_status text of `node` (names every node it is clustered with)."""
        return node.ctl("cluster_status")

    def _stop_order(self) -> list[RabbitNode]:
        return list(reversed(self.nodes))  # the joined nodes first, the seed node last

    def __str__(self) -> str:
        return f"local RabbitMQ cluster on AMQP ports {', '.join(map(str, self.ports))}"


# -- make cluster-up / cluster-down ------------------------------------------------------
def fixed_redis() -> LocalRedisCluster:
    return LocalRedisCluster(list(REDIS_PORTS), STATE_DIR)


def fixed_rabbit() -> LocalRabbitCluster:
    return LocalRabbitCluster(list(RABBIT_PORTS), STATE_DIR,
                              dist_ports=[p + RABBIT_DIST_OFFSET for p in RABBIT_PORTS])


def up(with_rabbit: bool) -> None:
    started = time.monotonic()
    cluster = fixed_redis().start()
    cluster.detach()
    print(f"redis      ok  {cluster.url}  ({time.monotonic() - started:.1f}s)", flush=True)
    if with_rabbit:
        started = time.monotonic()
        rabbit = fixed_rabbit().start()
        rabbit.detach()
        print(f"rabbitmq   ok  {mask_url(rabbit.url)}  "
              f"({time.monotonic() - started:.1f}s)", flush=True)


def down() -> None:
    if not STATE_DIR.exists():
        print("no local clusters")
        return
    fixed_rabbit().destroy()
    fixed_redis().destroy()
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    print("local clusters stopped and removed")


def status() -> int:
    redis_ok = fixed_redis().ready() if STATE_DIR.exists() else False
    print(f"redis      {'ok' if redis_ok else 'DOWN'}  ports {REDIS_PORTS[0]}-{REDIS_PORTS[-1]}")
    rabbit_up = [p for p in RABBIT_PORTS if port_open(p)]
    print(f"rabbitmq   {len(rabbit_up)}/{len(RABBIT_PORTS)} nodes answer on "
          f"{', '.join(map(str, RABBIT_PORTS))}")
    return 0 if redis_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.testing.clusters",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--no-rabbitmq", action="store_true",
                        help="only the Redis Cluster (a RabbitMQ node takes ~120 MB)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(with_rabbit=not args.no_rabbitmq)
        elif args.action == "down":
            down()
        else:
            return status()
    except LocalNodeFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
