"""Who is who on the message bus: one broker user per component, and its password.

Anyone who may publish to `resource.events` could otherwise fail a victim's order
or provision an instance for nobody, so each component logs in as its own user
with only the permissions it needs (`engine.admin.brokerusers` grants them), and
stamps that user in every message's user-id property, which the broker checks
against the login. A consumer trusts a message only from the one user allowed to
send it: the status consumer the Resource Domain's, the Resource Domain the
engine's. `amqp_url`'s own credentials (guest in development) are the
administrator's, which `seckill migrate` uses; no component trusts them.

Passwords come from files named for each user in `amqp_secrets_dir` (as
container secrets are mounted), so they never appear in a setting, an
environment variable or a log line. `seckill migrate` writes a missing file
with a random password; on several machines the operator copies each file to
the hosts of its component only.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from engine.config import Settings
from engine.errors import ConfigError

ENGINE, RESOURCE_DOMAIN = "engine", "resource_domain"
USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class BrokerLogin:
    """A component's user and the URL it connects with (password inside: never log it)."""

    component: str
    user: str
    url: str

    def __repr__(self) -> str:  # a traceback or a debug print must not show the password
        return f"BrokerLogin({self.component!r}, {self.user!r})"


def user_of(settings: Settings, component: str) -> str:
    """The broker user of `component` (no password needed to know who it is)."""
    if component == ENGINE:
        user = settings.amqp_engine_user
    elif component == RESOURCE_DOMAIN:
        user = settings.amqp_rd_user
    else:
        raise ValueError(f"unknown component {component!r}")
    if not USER_NAME.fullmatch(user):
        raise ConfigError(f"amqp_{'engine' if component == ENGINE else 'rd'}_user: expected "
                          f"1-64 of A-Z a-z 0-9 _ . -, got {user!r}")
    return user


def secrets_dir(settings: Settings) -> Path:
    if settings.amqp_secrets_dir:
        return Path(settings.amqp_secrets_dir)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "seckill" / "amqp"


def password_file(settings: Settings, user: str) -> Path:
    return secrets_dir(settings) / user


def read_password(settings: Settings, user: str) -> str:
    path = password_file(settings, user)
    try:
        password = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"no password for broker user {user!r} ({path} is missing): run "
                          "`seckill migrate`, which creates the users, or copy the file "
                          "from where it ran") from None
    except OSError as exc:
        raise ConfigError(f"broker user {user!r}: cannot read {path}: "
                          f"{exc.strerror or exc}") from None
    if not password:
        raise ConfigError(f"broker user {user!r}: {path} is empty")
    return password


def ensure_password(settings: Settings, user: str) -> str:
    """The user's password, a new random one written first if there is none (migrate)."""
    directory = secrets_dir(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / user
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # kept: components and other migrations already use it
        return read_password(settings, user)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
    return read_password(settings, user)


def with_user(amqp_url: str, user: str, password: str) -> str:
    """`amqp_url` (one broker or a list) logged in as `user` instead of its own user."""
    parts = urlsplit(amqp_url)
    hosts = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    return urlunsplit(parts._replace(netloc=netloc))


def login(settings: Settings, component: str) -> BrokerLogin:
    """How `component` connects: amqp_url's brokers and vhost, as its own user."""
    user = user_of(settings, component)
    return BrokerLogin(component, user,
                       with_user(settings.amqp_url, user, read_password(settings, user)))


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names ('/' when its path is empty, as aiormq reads it)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"
