"""Finding an operator's Python callable by name: "package.module:function" or an entry point.

The config checks at load time that a `kind = "python"` tool's callable exists, and the
tool workers load it by the same name in their own process.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "load_callable"]

ENTRY_POINT_GROUP = "veil.tools"


def load_callable(target: str) -> Any:
    """'package.module:function' or 'package.module.function', or an entry point's name."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == target]
    if found:
        return found[0].load()
    module, _, attribute = target.partition(":") if ":" in target else target.rpartition(".")
    if not module or not attribute:
        raise ValueError(
            f"{target!r} is not 'module:function' nor a '{ENTRY_POINT_GROUP}' entry point"
        )
    return getattr(importlib.import_module(module), attribute)
