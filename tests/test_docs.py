"""The README and docs/ say what the tree holds: every setting, and no dead link or path.

A renamed module, a moved page or a new setting fails here, naming what to fix, instead
of leaving a newcomer with a reference that points nowhere. `python tests/test_docs.py`
rewrites the settings table of docs/settings.md from engine/config.py.
"""

from __future__ import annotations

import glob
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, from anywhere
    sys.path.insert(0, str(ROOT))

from engine.config import ENV_PREFIX, describe  # noqa: E402

SETTINGS_PAGE = ROOT / "docs" / "settings.md"
BEGIN = "<!-- settings table: generated from engine/config.py by `python tests/test_docs.py` -->"
END = "<!-- end of the settings table -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a repository path in backticks: `engine/gate/app.py`, `bench/results/x.md`, `lua/`
PATH = re.compile(r"`((?:engine|bench|tests|loadtest|lua|db|proto|docs|\.ci)/[^`\s]*)`")
MODULE = re.compile(r"python -m ((?:engine|bench|loadtest)(?:\.\w+)*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    return f"`{value}`" if isinstance(value, str) else str(value)


def settings_table() -> str:
    """The settings of engine/config.py, in their declared order, as a markdown table."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, doc, default in describe():
        rows.append(f"| `{name}` (`{ENV_PREFIX}{name.upper()}`) | {_default(default)} | "
                    f"{doc.replace('|', '/')} |")
    return "\n".join(rows)


def _generated(text: str) -> str:
    assert BEGIN in text and END in text, f"{SETTINGS_PAGE}: the table's markers are missing"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write_settings_table() -> None:
    text = SETTINGS_PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    SETTINGS_PAGE.write_text(f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}")


def test_the_settings_page_lists_every_setting_as_config_declares_it():
    assert _generated(SETTINGS_PAGE.read_text()) == settings_table(), (
        "docs/settings.md is not what engine/config.py declares: run "
        "`python tests/test_docs.py` and commit docs/settings.md")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    return broken


def test_every_link_of_the_readme_and_docs_resolves():
    broken = {page.name: b for page in PAGES if (b := _broken_links(page))}
    assert not broken, broken


def _missing_paths(page: Path) -> list[str]:
    text = page.read_text()
    missing = []
    for path in PATH.findall(text):
        if any(c in path for c in "<{"):
            continue  # a pattern: bench/results/<date>-<host>.json
        if not glob.glob(str(ROOT / path)):
            missing.append(path)
    for module in MODULE.findall(text):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python -m {module}")
    return missing


def test_every_path_and_module_the_docs_name_exists():
    missing = {page.name: m for page in PAGES if (m := _missing_paths(page))}
    assert not missing, missing


if __name__ == "__main__":
    write_settings_table()
    print(f"{SETTINGS_PAGE.relative_to(ROOT)}: {len(describe())} settings")
