"""The results database: variants/<device>/<op>.jsonl, one JSON line per finished variant.

One writer at a time. Every change to a results file happens under an exclusive lock on a
sidecar file (`<op>.jsonl.lock`):

- `append` adds one record with a single write to a file opened for appending, flushed
  and fsynced, and always on a fresh line (a partial last line left by a crash is closed
  first, so the new record is never fused onto it).
- `rewrite` (a pack install or removal) reads, changes and replaces the whole file under
  the same lock, through a temporary file renamed over the old one: a concurrent sweep's
  appends wait for it and land in the new file; nothing is lost.
- `claim`/`release` let concurrent sweeps of one op share the work: a variant is run by
  the first sweep that claims it; a claim whose owner process died is taken over.

The lock is `fcntl.flock` on the sidecar, not on the data file: a replacement renames a
new file over the data file, so a lock held on the old inode would protect nothing. flock
needs no dependency, is released by the kernel when its holder dies (a crashed sweep
never leaves a stale lock) and works on the POSIX systems MLX runs on.

Reading takes no lock (a reader sees the file before or after an atomic replacement; an
append is one write) and validates every line against `SCHEMA_FIELDS`: a line that does
not parse or lacks a field is skipped with a warning naming file:line, never a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from . import config, paths

SCHEMA = 1

# The one description of a results record: field -> accepted types. `REQUIRED` must be
# present; the others are checked when present. (bool is a subclass of int: see _types_ok.)
_NUM = (int, float)
REQUIRED = {
    "op": (str,), "device": (str,), "backend": (str,), "template": (str,),
    "variant_id": (str, type(None)), "shape": (dict,), "shape_str": (str,), "dtype": (str,),
}
OPTIONAL = {
    "schema": (int,), "source": (str,), "status": (str, type(None)), "correct": (bool,),
    "error": (str, type(None)), "timing": (dict, type(None)), "checks": (list, type(None)),
    "params": (dict,), "family": (str, type(None)), "source_hash": (str, type(None)), "mlx": (str, type(None)),
    "repeat": (bool,), "timing_method": (int,), "date": (str, type(None)), "seed": (int, type(None)),
    # which device of a run timed it (a sweep over several GPUs): ranked against that device's built-in
    "timed_on": (str, type(None)),
}
SCHEMA_FIELDS = {**REQUIRED, **OPTIONAL}

# Failures that say nothing about the variant, only about the machine: the next run
# retries them (a template bug - compile_error, incorrect - is a result and stays).
RETRY_STATUSES = {"timeout", "crashed"}
ENVIRONMENT_ERRORS = ("no C++ compiler", "install binutils", "HLH_MLX_CXX", "lacks _Float16", "No space left",
                      "Cannot allocate memory", "out of memory", "[emulator] building the", "CUDA driver",
                      "no CUDA-capable device")


class RecordError(ValueError):
    """A results record that does not match the schema."""


def _types_ok(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def validate(rec) -> None:
    """Raise RecordError (saying which field) unless `rec` is a results record."""
    if not isinstance(rec, dict):
        raise RecordError(f"not an object but {type(rec).__name__}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise RecordError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for k, types in SCHEMA_FIELDS.items():
        if k in rec and not _types_ok(rec[k], types):
            raise RecordError(f"field {k!r} is {type(rec[k]).__name__}, expected "
                              + " or ".join("null" if t is type(None) else t.__name__ for t in types))
    t = rec.get("timing")
    if t and "median_ms" in t and (not _types_ok(t["median_ms"], _NUM) or not t["median_ms"] > 0):
        raise RecordError("timing.median_ms is not a positive number")


def retryable(rec: dict) -> bool:
    """A failure caused by the environment (no compiler, timeout, a crashed worker or
    toolchain): the next sweep runs the variant again instead of keeping the failure."""
    status = rec.get("status")
    if status in (None, "ok", "incorrect", "compile_error"):
        return False
    if status in RETRY_STATUSES:
        return True
    return any(s in str(rec.get("error") or "") for s in ENVIRONMENT_ERRORS)


def failed(rec: dict) -> bool:
    """Anything but a success (what `sweep --retry-failed` runs again)."""
    return rec.get("status") != "ok"


# a variant that timed out or crashed its worker this many times is not retried on its own
# any more (a kernel that hangs would cost --timeout on every run); --retry-failed still does
MAX_HANG_ATTEMPTS = 2


def to_redo(records: list[dict], mode: str = "environment") -> list[dict]:
    """The stored records a new sweep does not count as done. mode "environment": failures
    of the machine (a missing compiler every time; a timeout or crash until a variant has
    had MAX_HANG_ATTEMPTS of them); "failed": every failure; "all": everything."""
    if mode == "all":
        return list(records)
    if mode == "failed":
        return [r for r in records if failed(r)]
    hangs: dict[tuple, int] = {}
    for r in records:
        if r.get("status") in RETRY_STATUSES:
            hangs[result_key(r)] = hangs.get(result_key(r), 0) + 1
    return [r for r in records if retryable(r)
            and (r.get("status") not in RETRY_STATUSES or hangs[result_key(r)] < MAX_HANG_ATTEMPTS)]


def result_key(r: dict) -> tuple:
    """What makes two results the same measurement (a rerun skips it)."""
    return (r.get("variant_id") or "builtin", r.get("template"), r.get("backend"), r.get("shape_str"),
            r.get("dtype"), r.get("mlx"), r.get("source", "local"), bool(r.get("repeat")),
            r.get("timing_method", 1))


def path_for(device_slug: str, op: str, root: Path | None = None) -> Path:
    return (root or paths.results_dir()) / device_slug / f"{op}.jsonl"


# ---- the lock ---------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: Path):
    """Hold the exclusive lock of one results file (its `.lock` sidecar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _encode(record: dict) -> bytes:
    """One line; a record that does not match the schema is refused here (RecordError),
    not written to be skipped by every later read."""
    record = {"schema": SCHEMA, **record}
    validate(record)
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _append_unlocked(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # close a partial line left by a crash: never fuse onto it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def append(path: Path, record: dict) -> None:
    """Add one record (under the lock, on a fresh line, fsynced)."""
    data = _encode(record)
    with locked(path):
        _append_unlocked(Path(path), data)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a file's bytes all at once: a temporary file, fsynced, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def rewrite(path: Path, change) -> tuple[list[dict], list[dict]]:
    """Under the lock: `change(records) -> new records`, written atomically in place of the
    file (not written when nothing changed). Returns (old, new). Lines that do not match
    the schema are not the change's to drop: they are kept, verbatim, at the top."""
    path = Path(path)
    with locked(path):
        parsed = _parse(path)
        old = [rec for _, _, rec in parsed if rec is not None]
        new = change(list(old))
        if new != old:
            bad = b"".join(raw.rstrip(b"\n") + b"\n" for _, raw, rec in parsed if rec is None)
            write_atomic(path, bad + b"".join(_encode(r) for r in new))
    return old, new


# ---- reading ----------------------------------------------------------------------------

_warned: set[str] = set()


def _warn(msg: str) -> None:
    """Warn once per process about each bad line (a sweep reads its file many times)."""
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _parse(path: Path) -> list[tuple[int, bytes, dict | None]]:
    """(line number, raw line, the record or None when the line is skipped) per line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last_partial = n == len(lines)  # no newline after it: a write cut short (or a hand edit)
        try:
            rec = json.loads(raw)
        except ValueError as e:
            _warn(f"{path}:{n}: skipping a corrupt results line"
                  + (" (an interrupted write)" if last_partial else "") + f" ({e})")
            out.append((n, raw, None))
            continue
        try:
            validate(rec)
        except RecordError as e:
            _warn(f"{path}:{n}: skipping a results line that does not match the schema ({e})")
            out.append((n, raw, None))
            continue
        out.append((n, raw, rec))
    return out


def read(path: Path) -> list[dict]:
    """Every valid record of one file; a line that does not parse or does not match the
    schema is skipped with a warning naming file:line."""
    return [rec for _, _, rec in _parse(Path(path)) if rec is not None]


def load(device_slug: str, op: str) -> list[dict]:
    """Shipped results then local ones for a device and op. Every record carries its
    `source`: `local` (this store), `shipped` (results that came with an installed
    hlh_mlx), or `hub:OWNER/NAME@REV` (a pulled pack)."""
    records = []
    shipped = paths.shipped_results() if config.get("HLH_MLX_SHIPPED") else None
    local = paths.results_dir()
    if shipped is not None and shipped.resolve() != local.resolve():
        for r in read(path_for(device_slug, op, shipped)):
            records.append({**r, "source": "shipped"} if r.get("source", "local") == "local" else r)
    for r in read(path_for(device_slug, op, local)):
        records.append(r if "source" in r else {**r, "source": "local"})
    return records


# ---- sharing the work between concurrent sweeps -------------------------------------------

def _claims_path(path: Path) -> Path:
    return Path(f"{path}.claims")


def _read_claims(path: Path) -> dict:
    try:
        claims = json.loads(_claims_path(path).read_text())
        return claims if isinstance(claims, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or corrupt: claims are advisory, results are what count


def _write_claims(path: Path, claims: dict) -> None:
    """(under the lock) the claims file, removed when no claim is left."""
    if claims:
        write_atomic(_claims_path(path), json.dumps(claims).encode())
    else:
        _claims_path(path).unlink(missing_ok=True)


def _claim_key(key: tuple) -> str:
    return json.dumps(list(key))


def _alive(owner: dict, stale_after: float) -> bool:
    if owner.get("host") != socket.gethostname():
        return time.time() - owner.get("since", 0) < stale_after  # another machine: trust it for a while
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return int(owner.get("pid", 0)) > 0


def claim(path: Path, key: tuple, is_done, stale_after: float = 3600.0) -> str:
    """Try to take the work of one result key. Under the lock, returns
    "done" when a record of `key` for which `is_done(record)` holds is in the file,
    "claimed" when another live process holds it, else "mine" (the claim is now ours:
    append the result with `release` afterwards)."""
    path = Path(path)
    with locked(path):
        if any(result_key(r) == key and is_done(r) for r in read(path)):
            return "done"
        claims = _read_claims(path)
        k = _claim_key(key)
        owner = claims.get(k)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        if owner and (owner.get("pid"), owner.get("host")) != (me["pid"], me["host"]) and _alive(owner, stale_after):
            return "claimed"
        claims[k] = me
        _write_claims(path, claims)
        return "mine"


def release(path: Path, keys=None) -> None:
    """Drop this process's claims (of `keys`, or all of them)."""
    path = Path(path)
    if not _claims_path(path).exists():
        return
    with locked(path):
        claims = _read_claims(path)
        mine = {k for k, o in claims.items() if (o.get("pid"), o.get("host")) == (os.getpid(), socket.gethostname())}
        if keys is not None:
            mine &= {_claim_key(k) for k in keys}
        if mine:
            for k in mine:
                claims.pop(k)
            _write_claims(path, claims)


def append_result(path: Path, record: dict, key: tuple | None = None) -> None:
    """Append a result and drop this process's claim of `key`, in one locked step."""
    path = Path(path)
    data = _encode(record)
    with locked(path):
        _append_unlocked(path, data)
        if key is not None and _claims_path(path).exists():
            claims = _read_claims(path)
            if claims.pop(_claim_key(key), None) is not None:
                _write_claims(path, claims)
