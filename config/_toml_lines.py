"""Finding the line of a field in a TOML file, so config errors can name it.

tomllib keeps no positions; this follows table headers and keys line by line,
which covers the shapes Veil's config uses (tables, arrays of tables, keys).
"""

from __future__ import annotations

import re

__all__ = ["line_of"]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str]:
    """'models[0].pipeline' -> ['models', '0', 'pipeline']."""
    return [m.group(1) or m.group(2) for m in _PATH_PART.finditer(path)]


def _clean(key: str) -> list[str]:
    return [k.strip().strip("\"'") for k in key.split(".")]


def line_of(text: str, path: str) -> int | None:
    """The 1-based line where `path` is set (or its table starts), if found."""
    want = _parts(path)
    counts: dict[str, int] = {}
    table: list[str] = []
    best: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            names = _clean(header.group(2))
            if header.group(1) == "[[":
                name = ".".join(names)
                counts[name] = counts.get(name, -1) + 1
                table = [*names, str(counts[name])]
            else:
                table = names
            if want[: len(table)] == table:
                best = number  # the field may be missing: point at its table
            continue
        key = _KEY.match(line)
        if (
            key
            and [*table, *_clean(key.group(1))] == want[: len(table) + len(_clean(key.group(1)))]
        ):
            return number
    return best
