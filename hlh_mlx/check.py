"""Correctness of a kernel against its op's reference, on fresh random inputs.

Every check draws new inputs (never zeros), poisons the outputs so an element the kernel
never writes fails, and compares each output with the reference in float64:
- floating outputs: the normwise relative error ||y - ref|| / ||ref|| within the op's
  tolerance for the dtype; NaN/inf fail unless the reference has the same value at the
  same place (top-k over masked -inf logits);
- integer outputs (indices): exactly equal.
MLX fills every output with one init_value, and NaN means nothing to an integer output, so
a kernel with any non-floating output runs twice, poisoned with two different values: an
element holding each run's poison was never written.

On a GPU (`repeat=True`) every kernel runs twice on the same inputs and must give the same
bits: our templates reduce in a fixed order, so two answers that differ are a race (or a
reduction order that changes run to run), which a single comparison with the reference can
miss when both answers happen to lie within the tolerance. (The emulator's sanitizer finds
races by construction; its threads run in one order, so a repeat there proves nothing.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from .backends import poison_value
from .ops.spec import DTYPES, OpSpec


@dataclass
class CheckResult:
    ok: bool
    shape: dict
    dtype: str
    rel_err: float | None = None
    max_abs_err: float | None = None
    tolerance: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _f64(x: mx.array) -> np.ndarray:
    return np.asarray(x.astype(mx.float32)).astype(np.float64)


def _is_float(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.floating)


def compare(outs, refs, tol: float, scales=None) -> tuple[bool, float, float, str | None]:
    """Normwise relative error of floating outputs (exact equality for integer ones); with
    `scales` (the op's magnitude) the denominator is the larger of the reference's norm and
    theirs."""
    rel, mabs = 0.0, 0.0
    for i, (y, r) in enumerate(zip(outs, refs)):
        name = f"output {i}: " if len(outs) > 1 else ""
        if not _is_float(y):
            yi, ri = np.asarray(y), np.asarray(r)
            if yi.shape != ri.shape:
                return False, float("inf"), float("inf"), f"{name}shape {yi.shape}, expected {ri.shape}"
            wrong = yi != ri.astype(yi.dtype)
            if wrong.any():
                first = tuple(int(k) for k in np.argwhere(wrong)[0])
                return False, float("inf"), float("inf"), (
                    f"{name}{int(wrong.sum())} of {yi.size} integer outputs differ from the reference, first at "
                    f"{first}: {yi[first]} instead of {ri[first]}")
            continue
        y64, r64 = _f64(y), _f64(r)
        if y64.shape != r64.shape:
            return False, float("inf"), float("inf"), f"{name}output shape {y64.shape}, expected {r64.shape}"
        same_nonfinite = ~np.isfinite(r64) & ((y64 == r64) | (np.isnan(y64) & np.isnan(r64)))
        bad = ~np.isfinite(y64) & ~same_nonfinite
        if bad.any():
            first = tuple(int(k) for k in np.argwhere(bad)[0])
            return False, float("nan"), float("nan"), (
                f"{name}{int(bad.sum())} of {y64.size} outputs are NaN/inf (unwritten?) where the reference "
                f"is finite, first at {first}")
        if (~np.isfinite(r64) & ~same_nonfinite).any():
            first = tuple(int(k) for k in np.argwhere(~np.isfinite(r64) & ~same_nonfinite)[0])
            return False, float("nan"), float("nan"), f"{name}the reference is {r64[first]} at {first}, the kernel not"
        y64, r64 = np.where(same_nonfinite, 0.0, y64), np.where(same_nonfinite, 0.0, r64)
        diff = np.abs(y64 - r64)
        mabs = max(mabs, float(diff.max(initial=0.0)))
        denom = np.linalg.norm(r64)
        if scales is not None:
            denom = max(denom, float(np.linalg.norm(_f64(scales[i]))))
        rel = max(rel, float(np.linalg.norm(diff) / max(denom, 1e-30)))
    ok = rel <= tol
    return ok, rel, mabs, None if ok else f"relative error {rel:.3g} > tolerance {tol:g}"


def check(kernel, op: OpSpec, shape: dict, dtype: str, rng: np.random.Generator, repeat: bool = False) -> CheckResult:
    """Run `kernel` on fresh inputs for `shape` and compare with `op.reference`; with
    `repeat`, a second run on the same inputs must give the same bits."""
    dt = DTYPES[dtype]
    inputs = op.make_inputs(shape, dt, rng)
    out_dtypes = op.output_dtypes(dt)
    out_shapes = op.kernel_shapes(shape)
    refs = op.reference(*inputs)
    scales = op.magnitude(*inputs) if op.magnitude else None
    tol = op.tolerance[dtype]
    again = None
    if all(mx.issubdtype(d, mx.floating) for d in out_dtypes):
        outs = op.complete(inputs, kernel(inputs, shape, dtype, out_shapes, out_dtypes,
                                          init_value=poison_value(out_dtypes[0])))
        mx.eval(outs, refs, scales)
        if repeat:
            again = op.complete(inputs, kernel(inputs, shape, dtype, out_shapes, out_dtypes,
                                               init_value=poison_value(out_dtypes[0])))
            mx.eval(again)
    else:  # an integer output: NaN poisons nothing, so two runs with two poisons
        outs = kernel(inputs, shape, dtype, out_shapes, out_dtypes, init_value=POISONS[0])
        again = kernel(inputs, shape, dtype, out_shapes, out_dtypes, init_value=POISONS[1])
        mx.eval(outs, again, refs, scales)
        for i, (a, b) in enumerate(zip(outs, again)):
            pa, pb = (_host(mx.array(p).astype(a.dtype)) for p in POISONS)
            unwritten = (_host(a) == pa) & (_host(b) == pb)
            if unwritten.any():
                first = tuple(int(k) for k in np.argwhere(unwritten)[0])
                return CheckResult(False, dict(shape), dtype, None, None, tol,
                                   f"output {i}: {int(unwritten.sum())} of {unwritten.size} elements never written, "
                                   f"first at {first}")
        outs, again = op.complete(inputs, outs), op.complete(inputs, again)
    ok, rel, mabs, err = compare(outs, refs, tol, scales)
    if ok and repeat:
        err = _differs_between_runs(outs, again)
        ok = err is None
    return CheckResult(ok, dict(shape), dtype, rel, mabs, tol, err)


def _differs_between_runs(outs, again) -> str | None:
    """None when two runs on the same inputs gave the same bits (NaN where both have NaN:
    a reference's own non-finite values), else where they did not."""
    for i, (a, b) in enumerate(zip(outs, again)):
        x, y = _host(a), _host(b)
        same = (x == y) | (np.isnan(x) & np.isnan(y)) if np.issubdtype(x.dtype, np.floating) else x == y
        if not same.all():
            first = tuple(int(k) for k in np.argwhere(~same)[0])
            name = f"output {i}: " if len(outs) > 1 else ""
            return (f"{name}two runs on the same inputs differ in {int((~same).sum())} of {same.size} elements, "
                    f"first at {first} ({x[first]} and {y[first]}): a race between threads, or a reduction whose "
                    f"order changes from run to run")
    return None


def _host(a) -> np.ndarray:
    """`a` as numpy (bfloat16, which numpy has no type for, as its float32 values)."""
    return np.asarray(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


# Two poisons every output dtype can hold, far from typical data and from each other.
POISONS = (77.0, 121.0)


def check_shapes(kernel, op: OpSpec, variant, shapes, dtype: str, rng,
                 repeat: bool = False) -> tuple[list[CheckResult], str | None]:
    """Check a variant at every shape it supports, stopping at the first failure (`repeat`:
    each twice, as on a GPU; see the module docstring).

    Returns the results so far and the failure ("shape RxC: why") or None."""
    results = []
    for s in shapes:
        if not variant.supports(s, dtype):
            continue
        res = check(kernel, op, s, dtype, rng, repeat=repeat)
        results.append(res)
        if not res.ok:
            return results, f"shape {op.shape_str(s)}: {res.error}"
    if not results:  # never call a variant proven that was never run
        return results, f"supports none of the shapes checked ({', '.join(op.shape_str(s) for s in shapes)})"
    return results, None
