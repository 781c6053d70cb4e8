"""Where a fused decoder kernel's chain latency goes: host graph building, MLX encoding
(`mx.async_eval` returns once every node is queued) and the GPU, per call, for a chain of
dependent calls of one variant, beside the built-in composition it replaces.

    python benchmarks/fused_probe.py [--calls 100] [--out F [--force]]

A sweep's chain figure is encode + GPU per call (its clock runs around `mx.eval`); when
every variant of a template measures the same, something other than the kernel's memory
traffic bounds it, and this says which side. norm_qkv_rope is also run at offsets 0 and
3000 (its rotation's sin/cos run per rope pair). Cases are the Llama-3-8B decode shapes,
float16, with the templates' expected winners (their `expect`).

Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from hlh_mlx import backends, ops, paths, templates, variants
from hlh_mlx.cli import _params  # KEY=V pairs checked against the template's space
from hlh_mlx.ops.rope import _offset_array

CASES = [  # (op, shape, template family, expected winner's params)
    ("norm_qkv_rope", {"NQ": 4096, "NK": 1024, "K": 4096, "G": 64, "D": 128}, "splitk",
     None),
    ("norm_qkv_rope", {"NQ": 4096, "NK": 1024, "K": 4096, "G": 64, "D": 128}, "splitk",
     dict(KS=2, RPT=2, TEAMS=2, U=2, XS=4096, TRIG=64)),
    ("qgemv", {"N": 4096, "K": 4096, "G": 64}, "splitk", dict(KS=2, RPT=2, TEAMS=4, PW=4, U=2, CS=1, XS=4096)),
    ("qgemv_add", {"N": 4096, "K": 4096, "G": 64}, "splitk", dict(KS=2, RPT=2, TEAMS=4, PW=4, U=2, CS=1, XS=4096)),
    ("qgemv_add", {"N": 4096, "K": 14336, "G": 64}, "splitk", dict(KS=8, RPT=2, TEAMS=1, PW=4, U=2, CS=1, XS=0)),
    ("qgemv_swiglu", {"N": 14336, "K": 4096, "G": 64}, "splitk",
     dict(KS=1, RPT=2, TEAMS=4, PW=4, U=4, CS=1, XS=0)),
    ("norm_qgemv_swiglu", {"N": 14336, "K": 4096, "G": 64}, "splitk", None),
    ("norm_qgemv_swiglu", {"N": 14336, "K": 4096, "G": 64}, "splitk",
     dict(KS=1, RPT=2, TEAMS=4, PW=4, U=4, XS=4096)),
]


def _template(op, family):
    return next(t for t in templates.discover(op) if t.family == family and t.backend == "cuda")


def _chain(step, inputs, calls):
    """calls dependent calls: input 0 of each from the front of the previous first output
    (an output smaller than input 0 is copied over its front, a copy both sides pay)."""
    outs, x = [], inputs[0]
    for _ in range(calls):
        out = step(x, *inputs[1:])
        first = out[0] if isinstance(out, (list, tuple)) else out
        outs += list(out) if isinstance(out, (list, tuple)) else [out]
        flat = first.reshape(-1)
        if flat.size < x.size:
            flat = mx.concatenate([flat, x.reshape(-1)[flat.size:]])
        x = flat[: x.size].reshape(x.shape)
    return outs


def max_abs_error(got: list, want: list) -> float:
    """The largest absolute difference over all outputs, in float32."""
    return max(float(mx.max(mx.abs(g.astype(mx.float32).reshape(-1) - w.astype(mx.float32).reshape(-1))))
               for g, w in zip(got, want))


def per_call(step, inputs, calls) -> dict:
    mx.eval(_chain(step, inputs, 4))
    best = None
    for _ in range(5):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = _chain(step, inputs, calls)
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        t3 = time.perf_counter()
        r = {"build_us": 1e6 * (t1 - t0) / calls, "encode_us": 1e6 * (t2 - t1) / calls,
             "wait_us": 1e6 * (t3 - t2) / calls, "encode_plus_wait_us": 1e6 * (t3 - t1) / calls}
        best = r if best is None or r["encode_plus_wait_us"] < best["encode_plus_wait_us"] else best
    return {k: round(v, 2) for k, v in best.items()}


def case(op_name, shape, family, params, calls, offset=None) -> dict:
    op = ops.get(op_name)
    t = _template(op_name, family)
    if params is None:  # the template's own expected winner: the first KEY=V list of its expect
        params = _params(t, t.expect.split()[0].rstrip(":.,").split(","))
    v = variants.make(t, params)
    inputs = op.make_inputs(shape, mx.float16, np.random.default_rng(0))
    if offset is not None:
        inputs[-1] = _offset_array(offset)  # device-resident, as the runtime passes it
    mx.eval(inputs)
    launch = backends.Kernel(v, "cuda").launcher(shape, "float16", op.output_shapes(shape),
                                                 op.output_dtypes(mx.float16))
    builtin = op.baseline_for(shape)
    row = {"op": op_name, "shape": shape, "params": params, "offset": offset,
           "kernel": per_call(launch, inputs, calls), "builtin": per_call(builtin, inputs, calls)}
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    rows = []
    for op_name, shape, family, params in CASES:
        offsets = (0, 3000) if op_name == "norm_qkv_rope" else (None,)
        for off in offsets:
            try:
                rows.append(case(op_name, shape, family, params, a.calls, off))
            except Exception as e:  # report and go on: one broken case must not hide the others
                rows.append({"op": op_name, "shape": shape, "params": params, "offset": off,
                             "error": f"{type(e).__name__}: {e}"})
            r = rows[-1]
            if "error" in r:
                print(f"{op_name} {shape} {params} offset={off}: {r['error']}")
                continue
            k, b = r["kernel"], r["builtin"]
            print(f"{op_name} {'x'.join(map(str, shape.values()))} {params} offset={off}: "
                  f"kernel build {k['build_us']} encode {k['encode_us']} wait {k['wait_us']} "
                  f"(encode+wait {k['encode_plus_wait_us']}) | built-in build {b['build_us']} "
                  f"encode {b['encode_us']} wait {b['wait_us']} (encode+wait {b['encode_plus_wait_us']}) us/call")
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "calls": a.calls, "cases": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
