"""Every HLH_MLX_* setting, typed, with one default and one line saying what it does.

This table is the documentation (README "Settings" is tested against it). Settings read on
hot paths (HLH_MLX_STRICT) go through `get`; the rest are read where they are used.

Values are read from the environment when first asked for and then kept: the hot path of
a tuned call must not parse the environment. `reset()` (also called by
`hlh_mlx.tuned.refresh()`) forgets them, for a process that changes a setting mid-run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Knob:
    name: str
    default: object
    parse: Callable
    doc: str


KNOBS = {k.name: k for k in (
    Knob("HLH_MLX_STRICT", False, _flag, "a tuned call the built-in would serve raises FallbackError instead"),
    Knob("HLH_MLX_THROUGHPUT", False, _flag,
         "sweeps also time independent calls (throughput, labelled; never used to rank)"),
    Knob("HLH_MLX_VARIANTS", None, str, "results folder (default: the checkout's variants/, else the user data dir)"),
    Knob("HLH_MLX_SHIPPED", True, _flag,
         "read the results shipped with hlh_mlx beside the store's own (0: the store's alone, as on a fresh "
         "device; in a checkout, whose variants/ is both, set HLH_MLX_VARIANTS elsewhere too)"),
    Knob("HLH_MLX_TEMPLATES", None, str, "extra template folders, os.pathsep-separated"),
    Knob("HLH_MLX_SANITIZE", None, _flag, "emulator: check races, out-of-bounds, uninitialized reads (sweep/check: on)"),
    Knob("HLH_MLX_CACHE", None, str, "compiled emulator kernels (default ~/.cache/hlh_mlx)"),
    Knob("HLH_MLX_CACHE_MAX", "1G", str, "bound of the compile cache (e.g. 500M, 2G; 0: none)"),
    Knob("HLH_MLX_CXX", None, str, "the emulator's C++ compiler command (default g++, else clang++)"),
    Knob("HLH_MLX_EMU_TIMEOUT", 120.0, float, "emulator: seconds one kernel launch may run"),
    Knob("HLH_MLX_EMU_THREADS", None, int, "emulator: OS threads running threadgroups (default: the cores)"),
    Knob("HLH_MLX_EMU_MEMORY", None, int, "emulator: address-space limit of a kernel process, bytes"),
    Knob("HLH_MLX_EMU_ORDER", None, str, "emulator: 'reverse' runs threads in reverse order to expose races"),
    Knob("HLH_MLX_EMU_UNCONFINED_TOOLCHAIN", False, _flag,
         "emulator: compile kernels where Linux Landlock cannot confine the compiler (only kernel text you trust)"),
    Knob("HLH_MLX_WORKER", None, str, "the sweep's worker command (e.g. to run it under compute-sanitizer)"),
)}

_values: dict = {}
_on_reset: list = []


def get(name: str):
    """The setting's value (parsed once; its default when unset or empty)."""
    if name not in _values:
        knob = KNOBS[name]
        raw = os.environ.get(name, "")
        try:
            _values[name] = knob.parse(raw) if raw.strip() else knob.default
        except ValueError:
            raise ValueError(f"[hlh_mlx] {name}={raw!r}: {knob.doc}") from None
    return _values[name]


def check_all() -> None:
    """Parse every setting now, keeping nothing: a ValueError naming the first bad one (the
    command line checks them before any work; a worker would fail each variant on it)."""
    for knob in KNOBS.values():
        raw = os.environ.get(knob.name, "")
        try:
            if raw.strip():
                knob.parse(raw)
        except ValueError:
            raise ValueError(f"{knob.name}={raw!r} is not valid: {knob.doc}") from None


def reset() -> None:
    """Read every setting from the environment again on next use."""
    _values.clear()
    for hook in _on_reset:
        hook()


def on_reset(hook) -> None:
    """Call `hook()` whenever settings are reset (for values derived from them)."""
    _on_reset.append(hook)


def table() -> str:
    """The settings as a Markdown table (the README's copy is tested against this)."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    rows += [f"| `{k.name}` | {'' if k.default is None else k.default} | {k.doc} |" for k in KNOBS.values()]
    return "\n".join(rows)
