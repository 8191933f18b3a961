"""The suite's tracing phases (issue 25): the engine and the BFF at `trace_sample` 0, 0.01
and 1, against the same code before tracing existed, taking turns within each round.

- The untraced build is HEAD with the tracing merge (the first-parent commit that
  added engine/tracing.py) undone in engine/, everything before and after it kept:
  extracted with `git archive` into a temporary directory, the merge's changes
  reverted file by file (`git merge-file` where a file changed since), and run
  through PYTHONPATH; so the ratio prices tracing alone, not the engine's other
  changes since. A later commit that changed tracing's own lines (its hooks in the
  pipeline) says so with the trailer `Untraced-build: revert` in its message: it is
  undone first, newest first, so the merge's undo finds the lines it wrote. Where the
  revert conflicts, the commit before the merge stands in (the result says which).
  Without git history (a tarball) its rows say NO_HISTORY and the ratios are not met.
- Engine: side by side (bench.sidebyside): one worker of the untraced build and one
  of a traced variant read the same backlog at the same time, so the host's slow and
  quick moments land on both (drains taken apart moved 12.7 to 18.2 us per order
  within ten minutes here); three such drains per round for trace_sample 0 and 0.01,
  one for 1, services reset and idle before each. A traced variant's backlog carries
  the trace context on the share of entries its BFF would have sampled, as the gate
  writes it (bench/env.preload), and its worker exports to a real OTLP/HTTP receiver
  in this process (which only counts: decoding would take the cores being measured).
  At 0 the engine runs with tracing off, as a sale without tracing runs. Each variant
  is judged against the untraced worker beside it (`paired`).
- HTTP: the four BFFs (JWT on, every token verified once by every worker, as in the
  suite's HTTP phase); each traced one takes windows of new purchases at the same
  time as the untraced one (side by side, as the engine's drains), the variants'
  order reversed every other window; the BFF's CPU per accepted purchase over its
  windows, judged against the untraced BFF's windows beside it.

bench/report.py judges each round's ratios against the untraced build
(bench/verdicts.trace_ratios); 100% is reported, not judged.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.testing.otlp import OtlpReceiver
from engine.testing.processes import children

from .bff import BFF_PIDS, WARMUP_PID, HttpBench, merge_windows, open_sales
from .enginerun import TICK
from .httpload import Load, buy_path, load_window, wait_listening
from .sidebyside import SIDES, drain_pair
from .tokens import TokenFile, warm
from .verdicts import NO_HISTORY

ROOT = Path(__file__).resolve().parents[1]
UNTRACED = "untraced"
SAMPLES = {"0": 0.0, "0.01": 0.01, "1": 1.0}  # the traced variants' trace_sample
VARIANTS = (UNTRACED, *SAMPLES)
# buyers of the BFF windows: a window of 1 s buys up to 16,000 times, each token once on
# each of its 4 products (12 windows share the 48 sales); every BFF verifies them all
# before (2.5 s a BFF). 4,000 ran out in every window of the full run of 14:48.
TOKENS = 10_000


def _git(root: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          timeout=60, check=check).stdout


def tracing_merge(root: Path = ROOT) -> str | None:
    """The first-parent commit that brought engine/tracing.py, or None without history."""
    try:
        found = _git(root, "log", "--first-parent", "--diff-filter=A", "--format=%H",
                     "HEAD", "--", "engine/tracing.py").split()
    except (OSError, subprocess.SubprocessError):
        return None
    return found[-1] if found else None


REVERT_TRAILER = "Untraced-build: revert"  # a later commit that changed tracing's lines


def later_tracing_commits(merge: str, root: Path = ROOT) -> list[str]:
    """The first-parent commits after `merge` that carry REVERT_TRAILER, newest first."""
    return _git(root, "log", "--first-parent", "--format=%H", f"--grep=^{REVERT_TRAILER}$",
                f"{merge}..HEAD").split()


def untraced_commit(root: Path = ROOT) -> str | None:
    """The commit before tracing was merged, or None without git history."""
    merge = tracing_merge(root)
    if merge is None:
        return None
    return _git(root, "rev-parse", "--verify", "-q", merge + "^1", check=False).strip() or None


def extract(commit: str, into: Path, root: Path = ROOT) -> None:
    """The tree of `commit` as files under `into` (no .git, nothing of ours changed)."""
    archive = subprocess.Popen(["git", "archive", commit], cwd=root, stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True,
                       timeout=120)
    finally:
        if archive.stdout is not None:
            archive.stdout.close()
        if archive.wait(60):
            raise subprocess.CalledProcessError(archive.returncode, "git archive")


class RevertConflict(Exception):
    """A file of engine/ changed since tracing came, where its revert does not apply."""


def untraced_build(into: Path, root: Path = ROOT) -> str | None:
    """Under `into`, HEAD's tree with the tracing merge's changes to engine/ undone (what
    came before and after it kept), else, when that conflicts, the commit before
    tracing; what it is, or None without git history."""
    merge, before = tracing_merge(root), untraced_commit(root)
    if merge is None or before is None:
        return None
    head = _git(root, "rev-parse", "HEAD").strip()
    later = later_tracing_commits(merge, root)
    extract(head, into, root)
    try:
        for commit in later:
            _revert(root, into, commit, commit + "^1")
        _revert(root, into, merge, before)
    except RevertConflict as exc:
        shutil.rmtree(into)
        into.mkdir()
        extract(before, into, root)
        return f"{before[:12]} (the commit before tracing: its revert from HEAD conflicts in {exc})"
    also = f" and {', '.join(c[:12] for c in later)} (its later changes)" if later else ""
    return f"{head[:12]} with {merge[:12]} (tracing){also} reverted in engine/"


def _revert(root: Path, into: Path, merge: str, before: str) -> None:
    """Undo in `into` what `merge` changed in engine/ against `before` (its first parent)."""
    def show(commit: str, path: str) -> bytes:
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root,
                              capture_output=True, timeout=60, check=True).stdout

    changes = _git(root, "diff", "--no-renames", "--name-status", before, merge, "--",
                   "engine").splitlines()
    for status, path in (line.split("\t", 1) for line in changes):
        target = into / path
        if status == "A":
            target.unlink(missing_ok=True)
        elif status == "D":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(show(before, path))
        elif not target.exists():
            continue  # (deleted since: nothing to undo)
        elif target.read_bytes() == show(merge, path):
            target.write_bytes(show(before, path))
        else:  # changed since: a three-way merge of the undo
            with tempfile.TemporaryDirectory() as tmp:
                base, theirs = Path(tmp) / "base", Path(tmp) / "theirs"
                base.write_bytes(show(merge, path))
                theirs.write_bytes(show(before, path))
                merged = subprocess.run(["git", "merge-file", "-p", str(target), str(base),
                                         str(theirs)], capture_output=True, timeout=60)
            if merged.returncode != 0:
                raise RevertConflict(path)
            target.write_bytes(merged.stdout)


def _as_drain(run: dict[str, Any], side: str) -> dict[str, Any]:
    """One side of a side-by-side drain as bench.enginerun.drain gives a drain."""
    if run.get("failed") or "b_over_a" not in run:
        return {"failed": run.get("failed") or "no CPU per order"}
    own = run[side]
    return {"processed": own["orders"], "ticks": {"workers": own["ticks"]},
            "cpu_ns": own["cpu_ns"], "cpu_us_per_order": own["cpu_us_per_order"],
            "seconds": run["seconds"]}


def merge_drains(drains: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's drains as one: its ticks and orders summed, the first failure; its
    CPU per order from the drains' nanoseconds when each has them (side by side), else
    from their ticks."""
    failed = [d["failed"] for d in drains if d.get("failed")]
    if failed:
        return {"failed": failed[0], "drains": drains}
    ticks: dict[str, int] = {}
    for d in drains:
        for k, v in d["ticks"].items():
            ticks[k] = ticks.get(k, 0) + v
    processed = sum(d["processed"] for d in drains)
    used = sum(d.get("cpu_ns", 0) for d in drains) / 1e3 \
        if all("cpu_ns" in d for d in drains) else ticks["workers"] / TICK * 1e6
    return {"drains": drains, "processed": processed, "ticks": ticks,
            "cpu_us_per_order": used / processed if processed else 0.0}


def order(number: int) -> list[str]:
    """The variants' turn in round `number`: reversed every other round."""
    return list(VARIANTS if number % 2 == 0 else reversed(VARIANTS))


class TraceBench:
    """The untraced tree and the receiver of one suite run; `close` at its end."""

    def __init__(self, settings: Any, root: Path = ROOT) -> None:
        self.settings = settings
        self._tmp = tempfile.TemporaryDirectory(prefix="seckill-untraced-")
        tree = Path(self._tmp.name) / "tree"
        tree.mkdir()
        self.commit = untraced_build(tree, root)  # (what the untraced build is)
        self.tree = tree if self.commit is not None else None
        self.receiver = OtlpReceiver(keep=False).start()

    def close(self) -> None:
        self.receiver.stop()
        self._tmp.cleanup()

    def settings_of(self, name: str) -> dict[str, Any]:
        """A traced variant's settings (the untraced build knows none of them)."""
        if name == UNTRACED:
            return {}
        sample = SAMPLES[name]
        return {"trace_sample": sample,
                **({"trace_endpoint": self.receiver.endpoint} if sample else {})}

    def env_of(self, name: str) -> dict[str, str]:
        """A variant's environment beyond its settings: the untraced build's code."""
        return {"PYTHONPATH": str(self.tree)} if name == UNTRACED and self.tree else {}

    def tokens(self, minted: TokenFile) -> TokenFile:
        """The first TOKENS of the suite's minted buyers, in a file of their own."""
        path = Path(self._tmp.name) / "trace.tokens"
        if not path.exists():
            lines = minted.path.read_bytes().splitlines(keepends=True)[:TOKENS]
            path.write_bytes(b"".join(lines))
        return TokenFile(path, minted.first_user, min(TOKENS, minted.count))

    def head(self) -> dict[str, Any]:
        return {"untraced_commit": self.commit or NO_HISTORY,
                "receiver": {"requests": self.receiver.requests,
                             "bytes": self.receiver.bytes}}

    async def engine(self, number: int, orders: int,
                     reset: Callable[[list[int]], Awaitable[None]],
                     say: Callable[[str], None] = print) -> dict[str, Any]:
        """Side by side (bench.sidebyside): a drain of `orders` read at once by one worker
        of the untraced build and one of a traced variant, in this round's turn and
        back and in turn again for 0 and 0.01 (who starts first alternating), once
        for 100%. A variant's
        figure is its workers' ticks over their orders, and the untraced build's beside
        it (`paired`) is what it is judged against: drains taken apart moved 12.7 to
        18.2 us per order within ten minutes here, the two sides of one drain a few
        percent; three such drains a round for 0 and 0.01, one for 100%."""
        turn = [name for name in order(number) if name != UNTRACED]
        sides: dict[str, list[dict[str, Any]]] = {}
        paired: dict[str, list[dict[str, Any]]] = {}
        judged = [n for n in turn if n != "1"]
        for i, name in enumerate([*turn, *reversed(judged), *judged]):
            if self.tree is None:
                break
            run = await drain_pair(
                self.settings, {"a": self.env_of(UNTRACED), "b": self.env_of(name)},
                {"a": {}, "b": self.settings_of(name)}, orders, SAMPLES[name],
                SIDES[i % 2], reset=reset)
            theirs, ours = _as_drain(run, "a"), _as_drain(run, "b")
            paired.setdefault(name, []).append(theirs)
            sides.setdefault(name, []).append(ours)
            say(f"    untraced beside {name}: " + (
                f"FAILED {run['failed']}" if run.get("failed") else
                f"{theirs['cpu_us_per_order']:.1f} us/order ({theirs['processed']:,}) and "
                f"{ours['cpu_us_per_order']:.1f} ({ours['processed']:,}): "
                f"{run['b_over_a']:.3f}"))
        runs: dict[str, Any] = {name: merge_drains(d) for name, d in sides.items()}
        runs[UNTRACED] = merge_drains([d for p in paired.values() for d in p]) \
            if self.tree is not None else {"failed": NO_HISTORY}
        return {**self.head(), "workers": 1, "orders": orders, "side_by_side": True,
                "variants": runs, "paired": {n: merge_drains(p) for n, p in paired.items()}}

    async def http(self, bench: HttpBench, number: int, seconds: float, windows: int,
                   connections: int = 64, say: Callable[[str], None] = print
                   ) -> dict[str, Any]:
        """`windows` windows per traced variant, `seconds` per variant in all, each
        loading that variant's BFF and the untraced build's at the same time (as the
        engine's drains, side by side: BFF windows taken in turn read 74 to 87 us per
        purchase for the same build within a round here). A variant is judged against
        the untraced BFF's windows beside it (`paired`)."""
        names = [n for n in order(number) if n != UNTRACED]
        if self.tree is None:
            return {**self.head(), "windows": windows, "seconds": seconds,
                    "variants": {UNTRACED: {"failed": NO_HISTORY}}}
        per_window = len(BFF_PIDS) // (windows * len(names) * 2)
        tokens = self.tokens(bench.warm_tokens)
        await open_sales(self.settings, [*BFF_PIDS, WARMUP_PID])
        servers = {}
        for name in (UNTRACED, *names):
            env = {**self.env_of(name), **{f"SECKILL_{k.upper()}": str(v)
                                           for k, v in self.settings_of(name).items()}}
            servers[name] = bench.start_bff(env)[:2]
        parts: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        beside: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        used = 0

        def load() -> Load:
            nonlocal used
            used += per_window
            return Load(tuple(buy_path(p) for p in BFF_PIDS[used - per_window:used]), tokens)
        try:
            for server, port in servers.values():
                await wait_listening(port, server.proc, str(server.log_path))
                await warm(port, children(server.pid), tokens, WARMUP_PID)
                await load_window(server.proc, port, 1.0, connections,
                                  Load((buy_path(WARMUP_PID),), tokens))
            (base, base_port), length = servers[UNTRACED], seconds / windows
            for k in range(windows):
                for name in (names if k % 2 == 0 else reversed(names)):
                    server, port = servers[name]
                    theirs, ours = await asyncio.gather(
                        load_window(base.proc, base_port, length, connections, load()),
                        load_window(server.proc, port, length, connections, load()))
                    beside[name].append(theirs)
                    parts[name].append(ours)
        finally:
            for server, _ in servers.values():
                server.proc.send_signal(signal.SIGTERM)
            for server, _ in servers.values():
                server.proc.wait(30)
                server.log_path.unlink(missing_ok=True)
        runs: dict[str, Any] = {name: merge_windows(p) for name, p in parts.items()}
        runs[UNTRACED] = merge_windows([w for p in beside.values() for w in p])
        paired = {name: merge_windows(p) for name, p in beside.items()}
        for name in names:
            say(f"    BFF untraced beside {name}: "
                f"{paired[name]['cpu_us_per_accepted']:.1f} us/accepted "
                f"({paired[name]['ticks']} ticks) and {runs[name]['cpu_us_per_accepted']:.1f} "
                f"({runs[name]['ticks']} ticks)")
        return {**self.head(), "windows": windows, "seconds": seconds, "side_by_side": True,
                "variants": runs, "paired": paired}
