"""Op specs: what a kernel must compute, on which inputs, to what tolerance, and what
its roofline is. One module per op; `get(name)` finds one."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from .spec import OpSpec, Shape, parse_shape

__all__ = ["OpSpec", "Shape", "parse_shape", "get", "names"]


@lru_cache(maxsize=None)
def _names() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "spec"))


def names() -> list[str]:
    return list(_names())


@lru_cache(maxsize=None)
def get(name: str) -> OpSpec:
    if name not in names():
        raise KeyError(f"unknown op {name!r} (known: {', '.join(names())})")
    return importlib.import_module(f"{__name__}.{name}").OP
