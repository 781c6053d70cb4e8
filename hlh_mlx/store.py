"""The results database: variants/<device>/<op>.jsonl, one JSON line per finished variant.

A line is appended, flushed and fsynced as soon as its variant finishes, with a single
write to a file opened for appending, so an interrupted sweep loses nothing finished
and never leaves half a line behind a later one. Reading skips (and reports) any line
that does not parse. A rerun resumes: keys already present are not run again.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from . import paths

SCHEMA = 1


def result_key(r: dict) -> tuple:
    """What makes two results the same measurement (a rerun skips it)."""
    return (r.get("variant_id") or "builtin", r.get("template"), r.get("backend"), r.get("shape_str"),
            r.get("dtype"), r.get("mlx"), r.get("source", "local"), bool(r.get("repeat")),
            r.get("timing_method", 1))


def path_for(device_slug: str, op: str, root: Path | None = None) -> Path:
    return (root or paths.results_dir()) / device_slug / f"{op}.jsonl"


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"schema": SCHEMA, **record}, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict]:
    """Every parseable record of one file; a corrupt line is reported and skipped."""
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                warnings.warn(f"{path}:{n}: skipping a corrupt results line ({e})", RuntimeWarning, stacklevel=2)
                continue
            out.append(rec)
    return out


def load(device_slug: str, op: str) -> list[dict]:
    """Shipped results then local ones for a device and op."""
    records = []
    shipped = paths.shipped_results()
    local = paths.results_dir()
    roots = [local] if shipped is None or shipped.resolve() == local.resolve() else [shipped, local]
    for root in roots:
        records += read(path_for(device_slug, op, root))
    return records
