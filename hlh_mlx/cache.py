"""The compile cache, bounded: $HLH_MLX_CACHE (default ~/.cache/hlh_mlx).

The emulator (hlh_mlx/emulator/toolchain.py) builds into `<cache>/emulator/`:

    runtime-<mode>-<key>/   the runtime object and precompiled prelude, one per compiler,
                            mode and runtime source (a few MB; rebuilt when missing)
    kernels/<key>/          one compiled kernel program per translation unit (~2 MB each)
    **/.build-*             a build in progress (or one a killed process left behind)

Every entry is rebuilt on demand, so evicting one costs only a recompile. This module
measures the cache and evicts the least recently used kernels until it fits a bound:
$HLH_MLX_CACHE_MAX (e.g. `2G`, `500M`, `0` for no bound; default 1G). `hlh_mlx cache
info|clean` call it, and `sweep`/`check` call `enforce()` after their run. An entry used
in the last five minutes is never evicted (another process may be about to run it), and the
runtimes are removed only by `clean --all`. Last use is the newest atime/mtime of an entry's
files: with the usual `relatime` mount option a file's atime moves at most once a day after
its first use, so "least recently used" is approximate (never wrong by more than a day).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX = 1 << 30
RECENT_S = 300.0        # entries used this recently may be in use: never evicted
ABANDONED_S = 3600.0    # a .build-* folder older than this was left by a killed build


def root() -> Path:
    r = os.environ.get("HLH_MLX_CACHE")
    return Path(r) if r else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hlh_mlx"


def parse_size(text: str) -> int:
    """`1G`, `500M`, `64k`, `1.5GB`, `1048576` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def max_bytes() -> int:
    """The bound from $HLH_MLX_CACHE_MAX (0: none)."""
    text = os.environ.get("HLH_MLX_CACHE_MAX")
    if not text:
        return DEFAULT_MAX
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"HLH_MLX_CACHE_MAX: {e}") from None


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class Entry:
    path: Path
    kind: str       # kernel | runtime | partial
    bytes: int
    used: float     # last use (the newest atime/mtime of its files)


def _walk(d: Path):
    """`d` and everything under it, (path, lstat), skipping what vanishes on the way: other
    processes build, rename and evict entries while this one counts (Path.rglob raises then)."""
    try:
        yield d, d.lstat()
    except OSError:
        return
    for top, dirs, files in os.walk(d):  # os.walk skips folders it can no longer read
        for name in [*dirs, *files]:
            p = Path(top, name)
            try:
                yield p, p.lstat()
            except OSError:
                continue


def _measure(d: Path) -> tuple[int, float]:
    total, used = 0, 0.0
    for _, st in _walk(d):
        is_file = stat.S_ISREG(st.st_mode)
        if is_file:
            total += st.st_size
        used = max(used, st.st_mtime, st.st_atime if is_file else 0.0)
    return total, used


def entries() -> list[Entry]:
    base = root() / "emulator"
    out = []
    if not base.is_dir():
        return out
    dirs = [(d, "runtime") for d in base.glob("runtime-*")]
    kernels = base / "kernels"
    if kernels.is_dir():
        dirs += [(d, "kernel") for d in kernels.iterdir()]
    dirs = [(d, "partial" if d.name.startswith(".build-") else kind) for d, kind in dirs]
    dirs += [(d, "partial") for d in base.glob(".build-*")]
    for d, kind in dirs:
        if d.is_dir():
            size, used = _measure(d)
            out.append(Entry(d, kind, size, used))
    return out


def total_bytes() -> int:
    """Every byte under the cache root (what `du` would count, roughly)."""
    r = root()
    return sum(st.st_size for _, st in _walk(r) if stat.S_ISREG(st.st_mode)) if r.is_dir() else 0


def info() -> dict:
    es = entries()
    return {"root": str(root()), "bytes": total_bytes(), "max_bytes": max_bytes(),
            "kernels": sum(e.kind == "kernel" for e in es), "runtimes": sum(e.kind == "runtime" for e in es),
            "partial": sum(e.kind == "partial" for e in es)}


def clean(limit: int | None = None, everything: bool = False, now: float | None = None) -> tuple[int, int]:
    """Evict until the cache fits `limit` bytes (default: the bound); `everything` empties
    it. Abandoned partial builds go first, then kernels least recently used first, then
    never the runtimes. Returns (entries removed, bytes freed)."""
    now = time.time() if now is None else now
    if everything:
        r = root()
        size = total_bytes()
        n = len(entries())
        if r.is_dir():
            for child in r.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return n, size
    limit = max_bytes() if limit is None else limit
    es = entries()
    removed = freed = 0
    size = total_bytes()

    def drop(e: Entry):
        nonlocal removed, freed, size
        shutil.rmtree(e.path, ignore_errors=True)
        removed += 1
        freed += e.bytes
        size -= e.bytes

    for e in es:
        if e.kind == "partial" and now - e.used > ABANDONED_S:
            drop(e)
    if not limit:
        return removed, freed
    # runtimes stay (a few MB; a running process's emulator holds on to its runtime): only
    # `clean --all` removes them
    for e in sorted((e for e in es if e.kind == "kernel"), key=lambda e: e.used):
        if size <= limit:
            break
        if now - e.used < RECENT_S:
            continue
        drop(e)
    return removed, freed


def enforce() -> tuple[int, int]:
    """Keep the cache within $HLH_MLX_CACHE_MAX (after a sweep or check). Never raises:
    a cache that cannot be cleaned is not worth failing a run for."""
    try:
        limit = max_bytes()
        if not limit or total_bytes() <= limit:
            return 0, 0
        return clean(limit)
    except (OSError, ValueError):
        return 0, 0
