"""Correctness of a kernel against its op's reference, on fresh random inputs.

Every check draws new inputs (never zeros), poisons the outputs (NaN) so an element
the kernel never writes fails, rejects NaN/inf, and compares with the reference in
float64: the normwise relative error ||y - ref|| / ||ref|| must be within the op's
tolerance for the dtype. The max absolute error is reported alongside.
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


def compare(outs, refs, tol: float, scales=None) -> tuple[bool, float, float, str | None]:
    """Normwise relative error; with `scales` (the op's magnitude) the denominator is the
    larger of the reference's norm and theirs."""
    rel, mabs = 0.0, 0.0
    for i, (y, r) in enumerate(zip(outs, refs)):
        y64, r64 = _f64(y), _f64(r)
        if y64.shape != r64.shape:
            return False, float("inf"), float("inf"), f"output shape {y64.shape}, expected {r64.shape}"
        bad = ~np.isfinite(y64)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            return False, float("nan"), float("nan"), (
                f"{int(bad.sum())} of {y64.size} outputs are NaN/inf (unwritten?), first at {first}")
        diff = np.abs(y64 - r64)
        mabs = max(mabs, float(diff.max(initial=0.0)))
        denom = np.linalg.norm(r64)
        if scales is not None:
            denom = max(denom, float(np.linalg.norm(_f64(scales[i]))))
        rel = max(rel, float(np.linalg.norm(diff) / max(denom, 1e-30)))
    ok = rel <= tol
    return ok, rel, mabs, None if ok else f"relative error {rel:.3g} > tolerance {tol:g}"


def check(kernel, op: OpSpec, shape: dict, dtype: str, rng: np.random.Generator) -> CheckResult:
    """Run `kernel` once on fresh inputs for `shape` and compare with `op.reference`."""
    dt = DTYPES[dtype]
    inputs = op.make_inputs(shape, dt, rng)
    out_dtypes = op.output_dtypes(dt)
    outs = kernel(inputs, shape, dtype, op.output_shapes(shape), out_dtypes, init_value=poison_value(out_dtypes[0]))
    refs = op.reference(*inputs)
    scales = op.magnitude(*inputs) if op.magnitude else None
    mx.eval(outs, refs, scales)
    tol = op.tolerance[dtype]
    ok, rel, mabs, err = compare(outs, refs, tol, scales)
    return CheckResult(ok, dict(shape), dtype, rel, mabs, tol, err)


def check_shapes(kernel, op: OpSpec, variant, shapes, dtype: str, rng) -> tuple[list[CheckResult], str | None]:
    """Check a variant at every shape it supports, stopping at the first failure.

    Returns the results so far and the failure ("shape RxC: why") or None."""
    results = []
    for s in shapes:
        if not variant.supports(s, dtype):
            continue
        res = check(kernel, op, s, dtype, rng)
        results.append(res)
        if not res.ok:
            return results, f"shape {op.shape_str(s)}: {res.error}"
    if not results:  # never call a variant proven that was never run
        return results, f"supports none of the shapes checked ({', '.join(op.shape_str(s) for s in shapes)})"
    return results, None
