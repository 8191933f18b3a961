"""The chaos scoreboard: `bench/results/chaos-<time>.md` and `.json`, one row per fault
that was actually run (a fault not run has no row)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("fault", "accepted", "lost", "duplicated", "oversold", "unexpected", "bff_5xx",
           "recovery_s", "final_s", "verdict")


def _cell(value: Any, column: str = "") -> str:
    if value is None:  # bff_5xx: the fault has no BFF in front; recovery_s: never drained;
        # final_s: some order never reached its final state
        return "-" if column == "bff_5xx" else "never"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Fault scoreboard {doc['started']}", "", *doc["header"], "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in COLUMNS) + " |"
              for row in doc["rows"]]
    notes = [(row["fault"], row["notes"], row["examples"]) for row in doc["rows"]
             if row["notes"] or row["examples"]]
    if notes:
        lines += ["", "## Notes", ""]
        for fault, said, examples in notes:
            parts = [*said, *(f"{kind}: {', '.join(keys)}" for kind, keys in examples.items())]
            lines.append(f"- **{fault}**: " + "; ".join(parts))
    if doc.get("errors"):
        lines += ["", "## Faults that could not be run to the end", ""]
        lines += [f"- **{name}**: {error}" for name, error in doc["errors"].items()]
    lines += ["", f"{doc['passed']} of {len(doc['rows'])} faults pass; total "
                  f"{doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "chaos-" + doc["started"].replace(":", "").replace("-", "")
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    return md, js
