"""A flash sale for Locust: every simulated user tries to buy once, then follows the order;
after sold out some join the waitlist and poll their position, and some owners of a
RUNNING instance give it back.

Configured by environment (set by `loadtest/run.py`):
  SECKILL_LT_PRODUCT        product ID on sale
  SECKILL_LT_DOUBLE_CLICK   share of users who send the purchase twice at once (0..1)
  SECKILL_LT_RETRY          share of users who try again after any answer (0..1)
  SECKILL_LT_FINAL          order states that end the polling (default RUNNING,FAILED)
  SECKILL_LT_POLL_LIMIT     seconds a user polls before giving up
  SECKILL_LT_WAITLIST       share of users answered sold out who join the waitlist (0..1);
                            one still waiting after the poll limit leaves it (DELETE)
  SECKILL_LT_RELEASE        share of owners whose order ran who release it (0..1)
  SECKILL_LT_TIMEOUT        seconds before a request (HTTP or Redis) counts as timed out
  SECKILL_LT_SUMMARY        file to write Locust's final totals, failures and exceptions to
  SECKILL_LT_SIGNING_KEY    private JWK (`seckill keys init`): each user logs in with a token
                            minted from it for its own user ID; unset = no token (a BFF
                            with bff_auth = "none")
  SECKILL_BFF_JWT_ISSUER, SECKILL_BFF_JWT_AUDIENCE: the claims of the minted tokens
  SECKILL_REDIS_URL, SECKILL_KEY_PREFIX: where the tried-users set is kept
Every user ID that tried is added to `<prefix>loadtest:{<pid>}:tried`, which
the verifier compares with what the gate accepted.
Failures are recorded as "HTTP <code>", "timeout (<error>)" or "no answer (<error>)",
the texts `loadtest/judge.py` reads back from the summary. The summary is written when
Locust quits, from its final stats: its `--csv` files are rewritten only every second,
so they can miss the last second of a run (or all of a short one).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, User, between, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import WorkerRunner
from redis import BlockingConnectionPool, Redis
from redis.exceptions import TimeoutError as RedisTimeout

from engine.config import load_settings
from engine.gate.devkeys import DevIssuer
from engine.resources import lua_script

PRODUCT = int(os.environ.get("SECKILL_LT_PRODUCT", "1001"))
DOUBLE_CLICK = float(os.environ.get("SECKILL_LT_DOUBLE_CLICK", "0.1"))
RETRY = float(os.environ.get("SECKILL_LT_RETRY", "0.1"))
FINAL = set(os.environ.get("SECKILL_LT_FINAL", "RUNNING,FAILED").split(","))
POLL_LIMIT = float(os.environ.get("SECKILL_LT_POLL_LIMIT", "20"))
TIMEOUT = float(os.environ.get("SECKILL_LT_TIMEOUT", "10"))
SUMMARY = os.environ.get("SECKILL_LT_SUMMARY", "")
PREFIX = os.environ.get("SECKILL_KEY_PREFIX", "")
REDIS_URL = os.environ.get("SECKILL_REDIS_URL", "redis://127.0.0.1:6379/0")
TRIED = f"{PREFIX}loadtest:{{{PRODUCT}}}:tried"

SIGNING_KEY = os.environ.get("SECKILL_LT_SIGNING_KEY", "")
FIRST_USER = int(os.environ.get("SECKILL_LT_FIRST_USER", "1"))
USERS_PER_PROCESS = 10_000_000  # with --processes, each one names its own users
_user_ids: Iterator[int] | None = None  # made at the first user: see next_user
_settings = load_settings()
_issuer = DevIssuer(SIGNING_KEY, issuer=_settings.bff_jwt_issuer,
                    audience=_settings.bff_jwt_audience) if SIGNING_KEY else None
# shared by every simulated user: a blocking pool queues them instead of failing
_redis = Redis(connection_pool=BlockingConnectionPool.from_url(
    REDIS_URL, max_connections=64, timeout=30, socket_timeout=TIMEOUT,
    socket_connect_timeout=TIMEOUT))
# a request that raised one of these timed out (geventhttpclient, sockets, redis-py)
TIMEOUTS = (TimeoutError, socket.timeout, gevent.Timeout, RedisTimeout)
# answers that are correct in a flash sale: accepted, duplicate, sold out, no sale, shed
SALE_ANSWERS = (202, 409, 410, 404, 429)
WAITLIST = float(os.environ.get("SECKILL_LT_WAITLIST", "0.5"))
RELEASE = float(os.environ.get("SECKILL_LT_RELEASE", "0.1"))
# joined, already waiting, no sale, holds an order or stock left, full or ended, not
# started, shed
WAITLIST_ANSWERS = (202, 200, 404, 409, 410, 425, 429)
# left or released (again), nothing to give back, not running yet, shed
RELEASE_ANSWERS = (200, 202, 404, 409, 429)


def next_user() -> int:
    """A user ID no other process of this run gives out: each Locust worker process
    (--processes) counts from its own range. A worker learns its index from the master's
    acknowledgement, after `init` but before any user starts, so it is read here."""
    global _user_ids
    if _user_ids is None:
        env = _environment[0] if _environment else None
        runner = env.runner if env is not None else None
        index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        _user_ids = itertools.count(FIRST_USER + index * USERS_PER_PROCESS)
    return next(_user_ids)


_environment: list[Environment] = []


@events.init.add_listener
def _remember_environment(environment: Environment, **_: object) -> None:
    _environment.append(environment)


@events.quit.add_listener
def _write_summary(exit_code: int, **_: object) -> None:
    """Locust's final figures, for `loadtest/judge.py` (see the module docstring); written
    by the process that holds the totals (not by a --processes worker)."""
    env = _environment[0] if _environment else None
    if not SUMMARY or env is None or isinstance(env.runner, WorkerRunner):
        return
    exceptions = env.runner.exceptions.values() if env.runner else []
    summary = {"exit_code": exit_code, "requests": env.stats.total.num_requests,
               "failures": env.stats.total.num_failures,
               "errors": list(env.stats.serialize_errors().values()),
               "exceptions": sum(int(e["count"]) for e in exceptions)}
    Path(SUMMARY).write_text(json.dumps(summary, indent=1, default=str))


def login(user_id: int) -> dict[str, str]:
    """The headers of a logged-in user: a bearer token for its own ID (what a login
    service would hand out), or none when the gate runs without authentication."""
    if _issuer is None:
        return {}
    return {"Authorization": f"Bearer {_issuer.token(user_id, ttl=3600)}"}


def failure_text(status: int, error: BaseException | None) -> str:
    """How a failed request is named in Locust's reports (see the module docstring)."""
    if status:
        return f"HTTP {status}"
    # geventhttpclient wraps the socket's error: RetriesExceeded(..., original=timeout)
    if isinstance(error, TIMEOUTS) or isinstance(getattr(error, "original", None), TIMEOUTS):
        return f"timeout ({error!r})"
    return f"no answer ({error!r})"


def judge(r: Any, ok: tuple[int, ...]) -> None:
    """Mark a response caught with `catch_response=True` as a success or a named failure."""
    if r.status_code in ok:
        r.success()
    else:
        r.failure(failure_text(r.status_code, getattr(r, "error", None)))


class FlashSaleBuyer(FastHttpUser):
    """One person: buy (maybe double-click, maybe retry), then poll the order to the end;
    sold out, maybe wait in line for a returned unit; owning a running instance, maybe
    give it back."""

    wait_time = between(0, 0.05)
    weight = 4
    network_timeout = TIMEOUT
    connection_timeout = TIMEOUT

    def on_start(self) -> None:
        self.user_id = next_user()
        self.auth = login(self.user_id)

    def buy(self) -> int:
        with self.client.post(f"/api/v1/seckill/{PRODUCT}", json={"user_id": self.user_id},
                              headers=self.auth, name="POST /api/v1/seckill/[pid]",
                              catch_response=True) as r:
            judge(r, SALE_ANSWERS)
            return r.status_code

    @task
    def flash_sale(self) -> None:
        _redis.sadd(TRIED, self.user_id)
        if random.random() < DOUBLE_CLICK:
            clicks = [gevent.spawn(self.buy) for _ in range(2)]
            gevent.joinall(clicks)
            codes = [c.value for c in clicks]
        else:
            codes = [self.buy()]
        if random.random() < RETRY or 429 in codes:
            codes.append(self.buy())
        if 202 in codes:
            self.follow_order()
        elif 410 in codes and random.random() < WAITLIST:
            self.wait_in_line()
        # not self.stop(): that raises if Locust is already stopping this user at the
        # end of --run-time, which the report counts as an exception
        raise StopUser()

    def follow_order(self) -> None:
        deadline = time.monotonic() + POLL_LIMIT
        while time.monotonic() < deadline:
            state = self.order_state()
            if state in FINAL:
                if state == "RUNNING" and random.random() < RELEASE:
                    self.give_back()
                return
            gevent.sleep(0.25)

    def order_state(self) -> str | None:
        with self.client.get(f"/api/v1/seckill/{PRODUCT}/users/{self.user_id}",
                             headers=self.auth, name="GET /api/v1/seckill/[pid]/users/[uid]",
                             catch_response=True) as r:
            state = r.json().get("state") if r.status_code == 200 else None
            judge(r, (200,))
        return state

    def wait_in_line(self) -> None:
        """Join the waitlist, poll the position until a returned unit makes an order (then
        follow it) or the sale ends; still waiting at the poll limit: leave."""
        with self.client.post(f"/api/v1/seckill/{PRODUCT}/waitlist",
                              json={"user_id": self.user_id}, headers=self.auth,
                              name="POST /api/v1/seckill/[pid]/waitlist",
                              catch_response=True) as r:
            joined = r.status_code in (200, 202)
            judge(r, WAITLIST_ANSWERS)
        if not joined:
            return
        deadline = time.monotonic() + POLL_LIMIT
        while time.monotonic() < deadline:
            state = self.order_state()
            if state == "ENDED":
                return
            if state not in ("WAITLISTED", None):  # handed a unit: an order of its own
                self.follow_order()
                return
            gevent.sleep(0.5)
        self.give_back()

    def give_back(self) -> None:
        """DELETE the order: leave the waitlist, or release the running instance."""
        with self.client.delete(f"/api/v1/seckill/{PRODUCT}/users/{self.user_id}",
                                headers=self.auth,
                                name="DELETE /api/v1/seckill/[pid]/users/[uid]",
                                catch_response=True) as r:
            judge(r, RELEASE_ANSWERS)


class GateDirectUser(User):
    """The gate without HTTP: the same Lua script over Redis, timed as a Locust request."""

    wait_time = between(0, 0.01)
    weight = 1

    def on_start(self) -> None:
        self.script = _redis.register_script(lua_script("seckill.lua"))
        k = f"{{{PRODUCT}}}"
        self.keys = [f"{PREFIX}seckill:{k}:stock", f"{PREFIX}seckill:{k}:sale",
                     f"{PREFIX}seckill:{k}:buyers", f"{PREFIX}seckill:{k}:free-slots",
                     f"{PREFIX}stream:seckill:{k}"]
        self.user_id = next_user()

    @task
    def buy(self) -> None:
        _redis.sadd(TRIED, self.user_id)
        start = time.perf_counter()
        exc = None
        reply = None
        try:
            reply = self.script(keys=self.keys, args=[self.user_id, int(time.time())])
        except Exception as e:  # noqa: BLE001 - reported to Locust as a failure
            exc = e
        outcome = {0: "no_sale", 1: "accepted", 2: "duplicate", 3: "sold_out"}.get(
            int(reply[0]) if reply else -1, "error")
        events.request.fire(request_type="LUA", name=f"gate.buy ({outcome})",
                            response_time=(time.perf_counter() - start) * 1000,
                            response_length=0, exception=exc, context={})
        # not self.stop(): that raises if Locust is already stopping this user at the
        # end of --run-time, which the report counts as an exception
        raise StopUser()
