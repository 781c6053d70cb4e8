"""The selection rule, in one place: which stored variant serves a call, or the built-in.

A record counts only if it was timed by the newest timing method among its (shape, dtype,
back end), is not a second timing, is correct, and its template still renders the same
source. It is compared with the built-in timed in the same run (the built-in record
written last before it), by what a program pays per call: latency in a dependent chain
plus host time to build the call, and must win beyond the spread of both timings and by
more than the run's own second timings moved (`Candidate.clearly_wins`). `rank`,
`hlh_mlx.tuned`, `bench.py`, `export` and `hub` all ask here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

from . import hub, ops, store, templates, variants
from .ops.spec import DTYPES
from .timing import end_to_end_ms
from .variants import Variant

# A variant serves shapes moving at most this many times more or fewer bytes than the shape
# it won at: kernels that win at LLM prefill sizes lose at decode sizes, where launch
# overhead dominates.
MAX_EXTRAPOLATION = 8
# ... and at most this many times larger or smaller in every dimension: measured on the
# H200, a 4-bit gemv winner at 14336x4096 (same bytes) ran 1.5x slower than the built-in
# at 4096x14336, a different regime of the same op.
MAX_DIM_RATIO = 2
# Results of older timing methods are history, never a reason to run a variant: methods
# 1-3 timed batches of independent calls, which the GPU overlaps (throughput, not the
# latency a program sees) and stored no host cost.
MIN_METHOD = 4


def is_builtin(record: dict) -> bool:
    return record.get("template") == "builtin"


def newest_method(records) -> list[dict]:
    """Only the records timed by the newest timing method among them: numbers from an
    older method (e.g. independent calls, which the GPU overlaps) are never ranked against
    newer ones."""
    timed = [r.get("timing_method", 1) for r in records if r.get("timing")]
    if not timed:
        return list(records)
    m = max(timed)
    return [r for r in records if not r.get("timing") or r.get("timing_method", 1) == m]


def records_at(records, shape, dtype, backend) -> list[dict]:
    """The records of one shape, dtype and back end, in the order they were written."""
    return [r for r in records if r.get("shape") == shape and r.get("dtype") == dtype and r.get("backend") == backend]


def latest_with_baselines(records, shape, dtype, backend) -> tuple[dict, dict]:
    """The newest record per variant ("builtin" for the built-in), and for each variant the
    built-in record of the same run: the one written last before it on the same device
    (`timed_on`, when a run timed on several GPUs; a sweep times the built-in on each
    device before its first variant of every run), so a ratio never divides times from two
    machines, devices or days."""
    keep, base = {}, {}
    last_builtin: dict = {}  # timed_on -> the built-in record written last
    mine = records_at(records, shape, dtype, backend)
    for r in newest_method(mine):
        if r.get("repeat"):
            continue  # second timings check the first; they are not results of their own
        key = r.get("variant_id") or "builtin"
        keep[key] = r
        if key == "builtin":
            last_builtin[r.get("timed_on")] = r
        else:
            base[key] = last_builtin.get(r.get("timed_on"))
    return keep, base


def run_noise(records) -> dict[int, float]:
    """How far each run's own second timings moved: {id of the run's built-in record: the
    largest relative difference, end to end, between a record and its repeat in that run}.
    A sweep times the built-in, then the variants, then once more the built-in and its top
    pick (`repeat`); a run whose re-timing moved by 50% cannot show a 5% win."""
    out: dict = {}
    run, firsts = None, {}
    for r in records:
        key = r.get("variant_id") or "builtin"
        if not r.get("repeat"):
            if key == "builtin":
                run, firsts = id(r), {}
            firsts[key] = r
            continue
        first = firsts.get(key)
        a, b = end_to_end_ms(r.get("timing")), end_to_end_ms((first or {}).get("timing"))
        if run is not None and a and b:
            out[run] = max(out.get(run, 0.0), abs(a - b) / min(a, b))
    return out


def ratio(variant_timing: dict | None, builtin_timing: dict | None) -> dict:
    """Built-in over variant: GPU chain latency alone; end to end (latency + host); and end
    to end beyond the noise (the built-in's 10th percentile over the variant's 90th)."""
    v, b = variant_timing or {}, builtin_timing or {}
    gpu = b["median_ms"] / v["median_ms"] if v.get("median_ms") and b.get("median_ms") else None
    ve, be = end_to_end_ms(v), end_to_end_ms(b)
    vh, bh = (v.get("host_us") or 0.0) / 1e3, (b.get("host_us") or 0.0) / 1e3
    slow_v, fast_b = v.get("p90_ms") or v.get("median_ms"), b.get("p10_ms") or b.get("median_ms")
    robust = (fast_b + bh) / (slow_v + vh) if slow_v and fast_b else None
    return {"gpu": gpu, "end_to_end": be / ve if ve and be else None, "beyond_noise": robust}


def clears_the_bar(variant_timing: dict | None, builtin_timing: dict | None, noise: float = 0.0) -> bool:
    """The selection rule's test of one variant's timing against its run's built-in: it won
    end to end beyond the spread of both timings (the built-in's 10th percentile against
    its 90th, host times added), and by more than `noise`, how far its run's own re-timings
    moved (run_noise)."""
    robust = ratio(variant_timing, builtin_timing)["beyond_noise"]
    return robust is not None and robust > 1.0 + noise


@lru_cache(maxsize=None)
def current_variants(op: str) -> dict[tuple, Variant]:
    """(template relpath, params, source hash) -> the variant, from the templates shipped
    and in $HLH_MLX_TEMPLATES, and from packs the user trusted (hlh_mlx.hub)."""
    out = {}

    def add(t):
        for v in variants.expand(t):
            out.setdefault((t.relpath, tuple(sorted(v.param_dict.items())), v.source_hash), v)

    for t in templates.discover(op):
        add(t)
    for root in hub.trusted_template_roots():
        for p in sorted((root / op).glob("*.j2")):
            try:
                add(templates.load(p))
            except templates.TemplateError as e:  # a broken pack costs its results, not the call
                warnings.warn(f"[hlh_mlx.tuned] skipping a trusted pack's template: {e}", RuntimeWarning, stacklevel=3)
    return out


def variant_of(op: str, record: dict) -> Variant | None:
    """The current variant a stored record was measured with, or None if its template has
    changed since (another source) or the variant left the space."""
    return current_variants(op).get((record.get("template"), tuple(sorted((record.get("params") or {}).items())),
                                     record.get("source_hash")))


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    record: dict
    builtin: dict | None  # the built-in's timing from the same run
    noise: float = 0.0    # how far its run's own re-timings moved (run_noise)

    @property
    def speedup(self) -> dict:
        return ratio(self.record.get("timing"), self.builtin)

    @property
    def clearly_wins(self) -> bool:
        return clears_the_bar(self.record.get("timing"), self.builtin, self.noise)


@lru_cache(maxsize=None)
def trusted_records(op: str, device: str) -> tuple[dict, ...]:
    """The stored records of `op` on `device` that tuned calls may act on: local, shipped and
    trusted packs' (read once until `refresh()`)."""
    return tuple(r for r in store.load(device, op) if hub.is_trusted(r.get("source", "local")))


@lru_cache(maxsize=None)
def candidates(op: str, device: str, backend: str) -> tuple[Candidate, ...]:
    """Correct, timed, current variants on this device and back end, each with the built-in
    of its run; stale ones dropped with a warning."""
    records = trusted_records(op, device)
    groups: dict = {}
    for r in records:
        if r.get("backend") == backend:
            groups.setdefault((r.get("shape_str"), r.get("dtype")), []).append(r)
    out, stale = [], []
    for g in groups.values():
        g0 = g[0]
        keep, base = latest_with_baselines(g, g0.get("shape"), g0.get("dtype"), backend)
        noise = run_noise(newest_method(g))
        for key, r in keep.items():
            if key == "builtin" or not r.get("correct") or not r.get("timing"):
                continue
            if r.get("timing_method", 1) < MIN_METHOD:
                continue
            v = variant_of(op, r)
            if v is None:
                stale.append(f"{r.get('variant_id')} at {r.get('shape_str')}")
                continue
            b = base.get(key)
            out.append(Candidate(v, r, (b or {}).get("timing"), noise.get(id(b), 0.0) if b else 0.0))
    if stale:  # one line per op and device, however many records
        warnings.warn(f"[hlh_mlx.tuned] ignoring {len(stale)} stored {op} variant(s) on {device} whose template "
                      f"changed since it was tuned (re-run the sweep): {', '.join(stale[:4])}"
                      + (f" and {len(stale) - 4} more" if len(stale) > 4 else ""), RuntimeWarning, stacklevel=3)
    return tuple(out)


@lru_cache(maxsize=None)
def never_chosen(op: str, device: str, backend: str) -> bool:
    """No stored variant of `op` on this device and back end beat the built-in where it was
    measured, so `choose` gives the built-in for every call, whatever its shape or dtype."""
    return not any(c.clearly_wins for c in candidates(op, device, backend))


@dataclass(frozen=True)
class Choice:
    variant: Variant | None
    record: dict | None
    reason: str
    builtin: dict | None = None

    def __str__(self) -> str:
        if self.variant is None:
            return f"built-in: {self.reason}"
        t, b = self.record.get("timing") or {}, self.builtin or {}
        host = f", host {t['host_us']:.1f} us" if t.get("host_us") is not None else ""
        bhost = f", host {b['host_us']:.1f} us" if b.get("host_us") is not None else ""
        base = f" vs built-in {b['median_ms']:.4f} ms{bhost}" if b.get("median_ms") else ""
        return (f"variant {self.variant.id} ({self.variant.label()}), tuned at {self.record['shape_str']} "
                f"{self.record['dtype']} on {self.record['device']}: chain latency {t.get('median_ms', math.nan):.4f} ms"
                f"{host}{base}; {self.reason}")


def _distance(a: dict, b: dict) -> float:
    return sum(abs(math.log(max(a[k], 1)) - math.log(max(b[k], 1))) for k in a)


def choose(op_name: str, call, device: str, backend: str, untrusted_note=None) -> Choice:
    """The variant for a bound call: the exact shape if it was tuned, else the nearest tuned
    shape (within MAX_EXTRAPOLATION in bytes) whose variant supports it; used only where it
    beat the built-in end to end (chain latency + host cost) in its own run."""
    if isinstance(call, str):
        return Choice(None, None, call)
    op = ops.get(op_name)
    best, too_far, other_switch = None, [], []
    size = DTYPES[call.dtype].size
    for c in candidates(op.name, device, backend):
        r, v = c.record, c.variant
        if r["dtype"] != call.dtype or not v.supports(call.shape, call.dtype):
            continue
        if any(r["shape"].get(f) != call.shape[f] for f in op.flags):
            # a switch of the op (rope's TRAD, norm_qkv_rope's B, moe_route's ORDER and NORM)
            # is another computation with another built-in: its own timings only
            other_switch.append(r["shape_str"])
            continue
        ratio_bytes = op.bytes(call.shape, size) / max(op.bytes(r["shape"], size), 1)
        dims_apart = max(max(call.shape[k], r["shape"][k], 1) / max(min(call.shape[k], r["shape"][k]), 1)
                         for k in call.shape)
        if not 1 / MAX_EXTRAPOLATION <= ratio_bytes <= MAX_EXTRAPOLATION or dims_apart > MAX_DIM_RATIO + 1e-9:
            too_far.append(r["shape_str"])  # a winner at 64 MB says nothing about a 16 KB launch
            continue
        if not c.clearly_wins:
            continue  # never use a variant that did not clearly beat the built-in where it was measured
        key = (_distance(r["shape"], call.shape), end_to_end_ms(r["timing"]))
        if best is None or key < best[0]:
            best = (key, c)
    if best is None:
        untrusted = sorted({r["source"] for r in store.load(device, op.name)
                            if not hub.is_trusted(r.get("source", "local"))})
        note = (f" ({len(untrusted)} untrusted pack(s) ignored: {', '.join(untrusted)}; see `hlh_mlx trust`)"
                if untrusted else "")
        if other_switch:
            flags = ", ".join(f"{f}={call.shape[f]}" for f in op.flags)
            note += (f" (tuned only with other settings of {', '.join(op.flags)}, at "
                     f"{', '.join(sorted(set(other_switch))[:3])}{' ...' if len(set(other_switch)) > 3 else ''}: "
                     f"sweep --shape {op.shape_str(call.shape)} to tune this call's {flags})")
        if too_far:
            note += (f" (tuned only at {', '.join(sorted(set(too_far)))}: more than {MAX_EXTRAPOLATION}x "
                     f"away in bytes moved or {MAX_DIM_RATIO}x in a dimension; sweep --shape "
                     f"{op.shape_str(call.shape)} to tune this size)")
        return Choice(None, None, f"no stored {op.name} variant beats the built-in end to end (beyond the "
                                  f"spread of both timings and by more than its run's re-timing moved) for {call.dtype} "
                                  f"on {device} [{backend}]{note}")
    (dist, _), c = best
    how = "exact shape" if dist == 0 else f"nearest tuned shape {c.record['shape_str']}"
    s = c.speedup
    gpu = f"{s['gpu']:.2f}x" if s["gpu"] else "?"
    return Choice(c.variant, c.record, f"{how}, {s['end_to_end']:.2f}x the built-in end to end there "
                                       f"({gpu} on GPU chain latency alone)", c.builtin)


def builtin_us(op_name: str, call, device: str, backend: str) -> float | None:
    """The built-in's cost to a program at exactly this call's shape and dtype (chain latency
    + host time, microseconds) as last timed on this device; None when never timed there."""
    keep, _ = latest_with_baselines(trusted_records(op_name, device), call.shape, call.dtype, backend)
    e2e = end_to_end_ms((keep.get("builtin") or {}).get("timing"))
    return None if e2e is None else 1e3 * e2e


def refresh() -> None:
    trusted_records.cache_clear()
    candidates.cache_clear()
    never_chosen.cache_clear()
    current_variants.cache_clear()
