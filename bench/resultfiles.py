"""Where a benchmark's results go: bench/results/<name>-<UTC time>.json and, beside it, the
Markdown table a person reads, under one name, so every bench leaves both the same way."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, doc: Any, text: str | None = None) -> Path:
    """The JSON written (values JSON cannot hold as their str), and `text` as .md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    if text is not None:
        path.with_suffix(".md").write_text(text + "\n")
    return path
