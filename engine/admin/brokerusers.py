"""`seckill migrate`'s broker half of access control: one RabbitMQ user per component.

As the PostgreSQL roles are, each component's broker user gets only what it needs
on amqp_url's vhost (see `engine.amqp.logins` for why):

- the engine writes to `resource.events` with routing keys `instance.created` and
  `instance.released` only, and reads the status queue;
- the Resource Domain reads its two queues (created, released) and writes
  `instance.status` only;
- neither may declare, bind or delete anything (configure: nothing); the
  topology is the administrator's, declared by migrate as amqp_url's user.

The BFF needs no broker access and has no user. Routing keys are limited with
RabbitMQ's topic permissions.

The users are imported as definitions through `rabbitmqctl import_definitions`
(`amqp_admin_command`), which works on every node without a plugin: the password
goes in as a salted hash on standard input, never on a command line other users
can read in `ps`. Importing again updates the same users: harmless, and it
restores permissions an operator widened by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, ensure_password, user_of, vhost_of
from engine.amqp.topology import (
    EXCHANGE,
    QUEUE_CREATED,
    QUEUE_RELEASED,
    QUEUE_STATUS,
    RK_CREATED,
    RK_RELEASED,
    RK_STATUS,
)
from engine.config import Settings
from engine.errors import ServiceUnavailable

NOTHING = "^$"


def only(*names: str) -> str:
    """A permission pattern matching exactly one of `names`."""
    return f"^({'|'.join(re.escape(n) for n in names)})$"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one component's user may do on the vhost (RabbitMQ permission patterns)."""

    component: str
    write: str  # exchanges it may publish to
    read: str  # queues it may consume
    topic_write: str  # routing keys it may publish with on EXCHANGE


GRANTS = (
    Grant(ENGINE, write=only(EXCHANGE), read=only(QUEUE_STATUS),
          topic_write=only(RK_CREATED, RK_RELEASED)),
    Grant(RESOURCE_DOMAIN, write=only(EXCHANGE), read=only(QUEUE_CREATED, QUEUE_RELEASED),
          topic_write=only(RK_STATUS)),
)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(settings: Settings) -> dict[str, Any]:
    """The users, their permissions and topic permissions, as RabbitMQ definitions."""
    vhost = vhost_of(settings.amqp_url)
    users, permissions, topics = [], [], []
    for grant in GRANTS:
        user = user_of(settings, grant.component)
        users.append({"name": user, "password_hash": password_hash(ensure_password(settings, user)),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        permissions.append({"user": user, "vhost": vhost, "configure": NOTHING,
                            "write": grant.write, "read": grant.read})
        topics.append({"user": user, "vhost": vhost, "exchange": EXCHANGE,
                       "write": grant.topic_write, "read": NOTHING})
    return {"users": users, "permissions": permissions, "topic_permissions": topics}


def ensure_broker_users(settings: Settings, *, command: Sequence[str] | None = None,
                        env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    """Create or update both components' users on amqp_url's vhost; a line for migrate.

    `command` (default: `amqp_admin_command`) is the rabbitmqctl to run, `env` its
    environment (a local test node's HOME and cookie).
    """
    argv = [*(command or shlex.split(settings.amqp_admin_command)), "-q",
            "import_definitions", "--format", "json"]
    _run(argv, json.dumps(definitions(settings)), env, timeout)
    names = ", ".join(user_of(settings, g.component) for g in GRANTS)
    return f"rabbitmq vhost {vhost_of(settings.amqp_url)!r}: broker users {names} granted"


def delete_broker_users(settings: Settings, *, command: Sequence[str] | None = None,
                        env: Mapping[str, str] | None = None, timeout: float = 60) -> None:
    """Remove both users (a test session's own, at its end)."""
    base = [*(command or shlex.split(settings.amqp_admin_command)), "-q"]
    for grant in GRANTS:
        _run([*base, "delete_user", user_of(settings, grant.component)], "", env, timeout,
             missing_ok=True)


def _run(argv: list[str], stdin: str, env: Mapping[str, str] | None, timeout: float,
         *, missing_ok: bool = False) -> None:
    what = " ".join(argv[:1] + argv[-3:-2])
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout, env=dict(env) if env is not None else None)
    except FileNotFoundError:
        raise ServiceUnavailable(f"broker users: {argv[0]!r} not found (amqp_admin_command: "
                                 "rabbitmqctl of the broker's node)") from None
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"broker users: {what} gave no answer in {timeout:g}s") from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).strip().splitlines()
        why = text[-1] if text else f"exited with {done.returncode}"
        if missing_ok and "does not exist" in why:
            return
        raise ServiceUnavailable(f"broker users: {argv[0]} failed: {why}")
