"""Fault points: a test-only way to SIGKILL a worker at a chosen point of a batch.

Whether an order can be lost or provisioned twice depends on where a worker dies:
the tests and the chaos suite kill one at each point of a batch and check the ground
truth afterwards. Off by default: the environment is read once, at worker start, and
unset it leaves every point at one attribute check (`if FAULTS.armed`).

- `SECKILL_FAULT_POINT`: one of `POINTS`;
- `SECKILL_FAULT_COUNT`: kills in all (default 1), shared by the worker's respawns, so
  a respawned worker does not die at the same point again and again;
- `SECKILL_FAULT_DIR`: where the kills are counted, one file each (default: a directory
  named for the supervisor's PID under the temp directory).

These are not settings (`engine.config` does not know them): nothing in production sets
them, and `seckill` does not document them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import ConfigError

log = logging.getLogger("seckill.faults")

AFTER_READ = "after_read"  # a batch was read: its entries are pending, nothing else done
AFTER_LOG_COMMIT = "after_log_commit"  # rows committed, nothing published
AFTER_PUBLISH = "after_publish"  # events sent to the broker, its confirms not looked at
AFTER_CONFIRMS = "after_confirms"  # events confirmed, entries not acknowledged
MID_DEAD_LETTER = "mid_dead_letter"  # the dead letters sent, not the acks nor the EXEC
POINTS = (AFTER_READ, AFTER_LOG_COMMIT, AFTER_PUBLISH, AFTER_CONFIRMS, MID_DEAD_LETTER)
FLUSH_S = 0.2  # what was sent reaches the server before the kill


class FaultPoints:
    """The armed point of this worker process, if any."""

    __slots__ = ("armed", "point", "count", "ledger")

    def __init__(self) -> None:
        self.armed = False
        self.point = ""
        self.count = 0
        self.ledger = Path()

    def arm_from_env(self, env: Mapping[str, str], supervisor: int) -> None:
        """Arm the point `env` names, if any; ConfigError for a point that does not exist."""
        point = env.get("SECKILL_FAULT_POINT", "")
        if not point:
            return
        if point not in POINTS:
            raise ConfigError(f"SECKILL_FAULT_POINT: expected one of {', '.join(POINTS)}, "
                              f"got {point!r}")
        try:
            count = int(env.get("SECKILL_FAULT_COUNT", "1"))
        except ValueError:
            raise ConfigError("SECKILL_FAULT_COUNT: expected an integer") from None
        default = Path(tempfile.gettempdir()) / f"seckill-faults-{supervisor}"
        self.arm(point, count, Path(env.get("SECKILL_FAULT_DIR") or default))

    def arm(self, point: str, count: int, ledger: Path) -> None:
        ledger.mkdir(parents=True, exist_ok=True)
        self.point, self.count, self.ledger = point, count, ledger
        self.armed = count > 0
        log.warning("fault point %s armed: %d kills", point, count,
                    extra={"event": "fault_armed", "point": point})

    def reached(self, point: str) -> bool:
        """True if the worker is to die here: the armed point, and a kill is left (it is
        taken now). Once every kill is taken the points go back to costing nothing."""
        if point != self.point:
            return False
        for number in range(1, self.count + 1):
            try:
                fd = os.open(self.ledger / f"{point}-{number}", os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue  # taken by this worker's predecessor or a sibling
            os.close(fd)
            return True
        self.armed = False
        return False

    def kill(self) -> NoReturn:
        log.error("fault point %s: SIGKILL", self.point,
                  extra={"event": "fault_kill", "point": self.point})
        logging.shutdown()  # the line above is out before the process is gone
        os.kill(os.getpid(), signal.SIGKILL)
        raise SystemExit(137)  # not reached: SIGKILL cannot be caught

    async def kill_after_flush(self) -> NoReturn:
        """Let what was sent reach the server, then die, as a crash right after it would."""
        await asyncio.sleep(FLUSH_S)
        self.kill()

    async def kill_mid_write(self, redis: Any, pipe: Any) -> NoReturn:
        """Send the commands queued in `pipe` so far as `pipe` would (after a MULTI if it
        is a transaction), without the rest or the EXEC, and die."""
        conn = await redis.connection_pool.get_connection()
        commands = [args for args, _ in pipe.command_stack]
        if pipe.is_transaction:
            commands.insert(0, ("MULTI",))
        await conn.send_packed_command(conn.pack_commands(commands))
        await self.kill_after_flush()


FAULTS = FaultPoints()


async def after_publish() -> None:
    """The AFTER_PUBLISH point: the publisher calls it once a batch's frames are sent."""
    if FAULTS.armed and FAULTS.reached(AFTER_PUBLISH):
        await FAULTS.kill_after_flush()
