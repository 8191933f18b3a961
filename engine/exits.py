"""Every exit code a seckill process can end with, in one place.

The supervisor reads a worker's code to decide whether to respawn it or halt, systemd
reads the daemon's (the unit does not restart a halted daemon), and scripts read a
command's. `seckill --help` prints the table below.
"""

from __future__ import annotations

import textwrap

OK = 0
FAILED = 1  # a worker crashed (a bug, a dead background task); `buy` not accepted; a check failed
USAGE = 2  # called wrong: a bad option, setting, config file or input
SERVICE = 3  # a service failed or was unreachable
BOOT = SERVICE  # a worker could not boot (its services did not answer before boot_timeout)
HALTED = SERVICE  # the supervisor gave up: a worker failed to boot max_boot_failures times
LEASE_LOST = 4  # a worker lost its snowflake node-ID lease: respawned to take a new one
INTERRUPTED = 130  # Ctrl-C

TABLE = (
    (OK, "success; a stopped daemon drained in time"),
    (FAILED, "an unexpected error (a bug); a worker crashed (respawned with backoff); `buy` "
             "was not accepted"),
    (USAGE, "called wrong: bad option, setting, config file or input"),
    (SERVICE, "Redis, RabbitMQ or PostgreSQL failed or is unmigrated; for a worker: could not "
              "boot; for `seckill run`: halted after max_boot_failures boot failures in a row"),
    (LEASE_LOST, "a worker lost its node-ID lease; the supervisor respawns it with a new one"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def epilog() -> str:
    """The exit-code table for `seckill --help`."""
    rows = (textwrap.fill(text, 88, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
            for code, text in TABLE)
    return "exit codes:\n" + "\n".join(rows)
