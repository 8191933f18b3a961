"""`seckill run`: prepare the process, then hand over to the supervisor.

prometheus_client picks single- or multi-process mode when it is first
imported, so the metrics directory must be in the environment before
anything imports it; this module imports the supervisor only after that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(settings: Settings) -> Path:
    """A clean multiprocess directory: stale files of dead PIDs would add up forever."""
    path = Path(settings.metrics_dir) if settings.metrics_dir else Path(
        tempfile.mkdtemp(prefix="seckill-metrics-"))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def run(load: Callable[[], Settings], workers: int | None = None) -> int:
    settings = load()
    metrics_dir = prepare_metrics_dir(settings)
    from engine.process.supervisor import Supervisor  # after the environment is set, see above

    try:
        return Supervisor(load, workers).run()
    finally:
        if not settings.metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
