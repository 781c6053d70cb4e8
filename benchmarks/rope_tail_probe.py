"""Why norm_qkv_rope's kernel takes 20-40 us of GPU per call in a chain where qgemv, with
two thirds of its bytes, takes ~7 (benchmarks/results/nvidia-h200/fused_probe.json): the
same variant with parts of its source changed, each timed as fused_probe times a chain of
dependent calls, and checked against the op's reference at three offsets.

    python benchmarks/rope_tail_probe.py [--calls 100] [--out F [--force]]
    ncu ... python benchmarks/rope_tail_probe.py --profiler --calls 5   # each kernel's own duration
      (with --profiler, the 4096x4096 qgemv winner is launched after the edits, for comparison)

Edits (each a text replacement in the rendered source; the rest of the kernel unchanged):
  as_is     the variant as the template renders it (PARAMS: two plans, fp64 sin/cos, TRIG=64)
  sincosf   sin and cos in fp32 (`sincosf`, full range reduction) instead of fp64
  reduced_fast  the angle reduced to [-pi, pi] by hand, then `__sincosf`
  no_rope   no rotation at all (wrong values: timing only, to bound the tail's cost)
  no_norm   no sum of x^2 and no multiply by norm_w in the dot loop (wrong values: timing only)
  no_norm_no_rope  both left out: what is left is a three-weight 4-bit gemv
Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_probe import _template, max_abs_error, per_call  # noqa: E402

from hlh_mlx import backends, ops, paths, variants  # noqa: E402
from hlh_mlx.cli import _params  # noqa: E402
from hlh_mlx.ops.rope import _offset_array  # noqa: E402

SHAPE = {"NQ": 4096, "NK": 1024, "K": 4096, "G": 64, "D": 128}
FP64 = """            double sd, cd;
            sincos(static_cast<double>(theta), &sd, &cd);
            const float sn = static_cast<float>(sd), cs = static_cast<float>(cd);"""
NORM = """                ssq += f * f;
                hv[j] = f * static_cast<float>(ws.v[j]);"""
EDITS = {  # name: {original text: replacement}
    "as_is": {},
    "sincosf": {FP64: "            float sn, cs;\n            sincosf(theta, &sn, &cs);"},
    # the angle reduced to [-pi, pi] by hand (2 pi in two fp32 parts, fma), then the hardware
    # approximation, accurate on that range whatever the compile flags
    "reduced_fast": {FP64: """            const float turns = rintf(theta * 0.159154943091895336f);
            float r = fmaf(-turns, 6.28318548202514648f, theta);
            r = fmaf(turns, 1.74845553e-7f, r);
            float sn, cs;
            __sincosf(r, &sn, &cs);"""},
    "no_rope": {FP64: "            const float sn = 0.0f * theta, cs = 1.0f;"},
    # the norm's share: no sum of x^2, no multiply by norm_w (wrong values: timing only)
    "no_norm": {NORM: "                hv[j] = f;"},
    "no_norm_no_rope": {NORM: "                hv[j] = f;", FP64: "            const float sn = 0.0f * theta, cs = 1.0f;"},
}
PARAMS = ["KS=2,RPT=2,TEAMS=2,U=2,XS=0,TRIG=64", "KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=64"]  # edits of the fp64 text


def edited(params: str, edit: dict):
    t = _template("norm_qkv_rope", "splitk")
    v = variants.make(t, _params(t, params.split(",")))
    if edit:
        r, source = v.rendered, v.rendered.source
        for old, new in edit.items():
            if old not in source:
                raise ValueError(f"the template no longer has {old.strip()[:40]!r}: update this probe")
            source = source.replace(old, new)
        v.__dict__["rendered"] = dataclasses.replace(r, source=source)
        v.__dict__.pop("id", None)  # a new kernel name for the new text
    return v


def max_error(launch, op, offsets=(0, 3000, 100000)) -> dict:
    out = {}
    for off in offsets:
        inputs = op.make_inputs(SHAPE, mx.float16, np.random.default_rng(1))
        inputs[-1] = _offset_array(off)
        out[str(off)] = round(max_abs_error(launch(*inputs), op.reference(*inputs)), 5)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profiler", action="store_true",
                    help="under a profiler (ncu): each edit's kernel launched --calls times, nothing else")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    op = ops.get("norm_qkv_rope")
    rows = []
    for params in PARAMS:
        for name, edit in EDITS.items():
            row = {"params": params, "edit": name}
            try:
                v = edited(params, edit)
                launch = backends.Kernel(v, "cuda").launcher(SHAPE, "float16", op.output_shapes(SHAPE),
                                                             op.output_dtypes(mx.float16))
                if a.profiler:
                    inputs = op.make_inputs(SHAPE, mx.float16, np.random.default_rng(0))
                    inputs[-1] = _offset_array(3000)
                    for _ in range(a.calls):
                        mx.eval(launch(*inputs))
                    continue
                row["max_abs_error"] = max_error(launch, op)
                for off in (0, 3000):
                    inputs = op.make_inputs(SHAPE, mx.float16, np.random.default_rng(0))
                    inputs[-1] = _offset_array(off)
                    mx.eval(inputs)
                    row[f"offset_{off}"] = per_call(launch, inputs, a.calls)
            except Exception as e:  # report and go on: one broken edit must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(json.dumps(row))
    if a.profiler:  # and the 4096x4096 qgemv winner beside it: two thirds of its bytes, ~7 us in a chain
        q = ops.get("qgemv")
        shape = {"N": 4096, "K": 4096, "G": 64}
        t = _template("qgemv", "splitk")
        v = variants.make(t, _params(t, "KS=2,RPT=2,TEAMS=4,PW=4,U=2,CS=1,XS=4096".split(",")))
        launch = backends.Kernel(v, "cuda").launcher(shape, "float16", q.output_shapes(shape), q.output_dtypes(mx.float16))
        inputs = q.make_inputs(shape, mx.float16, np.random.default_rng(0))
        for _ in range(a.calls):
            mx.eval(launch(*inputs))
        return
    inputs = op.make_inputs(SHAPE, mx.float16, np.random.default_rng(0))
    inputs[-1] = _offset_array(0)
    mx.eval(inputs)
    rows.append({"edit": "builtin", "offset_0": per_call(op.baseline_for(SHAPE), inputs, a.calls)})
    print(json.dumps(rows[-1]))
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "tolerance_float16": op.tolerance["float16"], "calls": a.calls, "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
