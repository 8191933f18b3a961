"""The files the package ships besides its code: the gate's Lua scripts and the
database migrations.

They live inside the package (`engine/lua`, `engine/migrations`) and are read
through importlib.resources, never by a path relative to the source tree, so an
installed wheel, far from any checkout, can still open a sale and migrate. The
checkout's top-level `lua/` and `db/migrations` are symlinks to these folders.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

PACKAGE = "engine"


def _shipped(*parts: str) -> Traversable:
    found = files(PACKAGE)
    for part in parts:
        found = found / part
    return found


def lua_script(name: str) -> str:
    """The source of the gate script `name` (e.g. "seckill.lua")."""
    return _shipped("lua", name).read_text(encoding="utf-8")


@contextmanager
def migrations_dir() -> Iterator[Path]:
    """A real directory of the migrations for the time of the `with`: dbmate, a
    separate program, takes a folder path, not a Python resource."""
    with as_file(_shipped("migrations")) as folder:
        yield folder
