"""Judge a Locust run from its own CSV reports: did the rehearsal measure a healthy gate?

Locust's exit code alone cannot say: it is 1 for a single tolerated failure and
0 when no request was made at all. So `loadtest/run.py` reads the summary the
locustfile writes from Locust's final stats when Locust quits (its `--csv` files
are rewritten only once a second and can miss the end of a run) and fails the
rehearsal, with the reason, when

  - Locust itself failed: it exited with anything but 0 or 1, it wrote no
    stats, it made no request, a user's code raised, or it exited 1 with no
    failure or exception recorded to explain it;
  - any answer was a 5xx or any request timed out (a flash sale must degrade
    into 409/410/429, never into server errors or hung requests);
  - failures of any kind exceed `max_failure_ratio` of all requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import SeckillError

# Failures tolerated (share of all requests) before the rehearsal fails: a refused
# connection or an unexpected 4xx now and then on a loaded 2-core box, not more.
MAX_FAILURE_RATIO = 0.001

# Failure texts that fail the rehearsal whatever their number. The locustfile
# reports them as "HTTP 503" and "timeout (...)"; Locust's own forms are matched
# too (LocustBadStatusCode(code=503), "timed out") for failures it records itself.
SERVER_ERROR = re.compile(r"\b(?:HTTP |code=)5\d\d\b")
TIMEOUT = re.compile(r"time(?:d)?[ _-]?out", re.IGNORECASE)


class RehearsalFailed(SeckillError):
    """The load test did not measure what it claims: the reason is the message."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One kind of failed request: an error text and how often it was seen."""

    method: str
    name: str
    error: str
    occurrences: int


@dataclass(slots=True)
class LocustReport:
    """What Locust wrote about one run; `requests is None` when it wrote no stats."""

    requests: int | None = None
    failures: int = 0
    errors: list[Failure] = field(default_factory=list)
    exceptions: int = 0

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def read_report(path: Path) -> LocustReport:
    """Read the summary the locustfile wrote; an empty report if there is none."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return LocustReport()
    return LocustReport(
        requests=int(data["requests"]), failures=int(data["failures"]),
        errors=[Failure(e["method"], e["name"], str(e["error"]), int(e["occurrences"]))
                for e in data["errors"]],
        exceptions=int(data["exceptions"]))


def judge(returncode: int, report: LocustReport,
          max_failure_ratio: float = MAX_FAILURE_RATIO) -> list[str]:
    """Every reason this run fails the rehearsal; empty when it passes."""
    reasons = _locust_failed(returncode, report)
    if report.requests is None:
        return reasons
    server = sum(e.occurrences for e in report.errors if SERVER_ERROR.search(e.error))
    if server:
        reasons.append(f"{server} answers were server errors (5xx), e.g. "
                       f"{_example(report, SERVER_ERROR)}")
    timeouts = sum(e.occurrences for e in report.errors if TIMEOUT.search(e.error))
    if timeouts:
        reasons.append(f"{timeouts} requests timed out, e.g. {_example(report, TIMEOUT)}")
    if report.failure_ratio > max_failure_ratio:
        reasons.append(f"failure ratio {report.failure_ratio:.4f} ({report.failures} of "
                       f"{report.requests} requests) is above the limit {max_failure_ratio}")
    return reasons


def _locust_failed(returncode: int, report: LocustReport) -> list[str]:
    if report.requests is None:
        return [f"Locust wrote no stats (exit code {returncode})"]
    reasons = []
    if returncode not in (0, 1):
        reasons.append(f"Locust exited with {returncode}")
    elif returncode == 1 and not report.failures and not report.exceptions:
        reasons.append("Locust exited with 1 and recorded no failure to explain it")
    if report.requests == 0:
        reasons.append("Locust made no requests")
    if report.exceptions:
        reasons.append(f"the Locust users raised {report.exceptions} exceptions "
                       "(see the _exceptions.csv report)")
    return reasons


def _example(report: LocustReport, pattern: re.Pattern[str]) -> str:
    worst = max((e for e in report.errors if pattern.search(e.error)),
                key=lambda e: e.occurrences)
    return f"{worst.name}: {worst.error} x{worst.occurrences}"
