"""Does where a kernel's small inputs live set its time? MLX's CUDA allocator puts every
array of at most 8 bytes (an eps, a rope offset) in a small pool of managed memory that the
GPU reads across the bus, so each GPU read of such a scalar crosses PCIe. A kernel that reads one in every warp, after its
weights, would wait on the bus once per warp. This times the same kernels in a chain of
dependent calls with their scalars as made (`mx.array([v])`) and as views into arrays a GPU
op wrote (device memory), and checks both give the same answer.

    python benchmarks/scalar_inputs_probe.py [--calls 200] [--moe] [--out F [--force]]

Cases: a one-line kernel `y = x * s[0]` (4096 values); norm_qkv_rope at
the Llama-3-8B decode shape, two plans (eps, offset); rms_norm at one row of 4096 (eps); with
--moe only moe_qgemv_combine at Qwen1.5-MoE's decode shape (its four scores: fp16 as mlx-lm's
routing makes them, 8 bytes, against float32 in device memory). Writes a table
to stdout; the JSON to F only when --out F is given.
"""

import argparse
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_probe import _template, max_abs_error, per_call  # noqa: E402

from hlh_mlx import backends, ops, paths, variants  # noqa: E402
from hlh_mlx.ops import spec  # noqa: E402
from hlh_mlx.cli import _params  # noqa: E402

SCALE_SOURCE = """
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < x_shape[0]) y[i] = x[i] * s[0];
"""


def scale_case(calls):
    k = mx.fast.cuda_kernel(name="hlh_probe_scale", input_names=["x", "s"], output_names=["y"], source=SCALE_SOURCE)
    x = mx.random.normal((4096,)).astype(mx.float16)

    def launch(x, s):
        return k(inputs=[x, s], grid=(4096, 1, 1), threadgroup=(256, 1, 1), output_shapes=[x.shape],
                 output_dtypes=[x.dtype])
    rows = []
    for where in ("made", "device"):
        # device: in memory a GPU op wrote, as the runtime makes it (spec.input_constant)
        s = spec.input_constant([1.0], mx.float16) if where == "device" else mx.array([1.0], dtype=mx.float16)
        mx.eval(x, s)
        rows.append({"case": "scale 4096", "scalars": where, **per_call(launch, [x, s], calls)})
    return rows


def template_case(op_name, family, shape, params, scalar_names, calls, made_dtype=None):
    """`made_dtype`: the scalars' dtype as made (moe_qgemv_combine's scores: fp16, 8 bytes for
    four, as mlx-lm's routing gives them; the kernel's inputs otherwise)."""
    op = ops.get(op_name)
    t = _template(op_name, family)
    params = _params(t, params.split(","))
    v = variants.make(t, params)
    launch = backends.Kernel(v, "cuda").launcher(shape, "float16", op.output_shapes(shape), op.output_dtypes(mx.float16))
    rows = []
    for where in ("made", "device"):
        inputs = op.make_inputs(shape, mx.float16, np.random.default_rng(0))
        want = op.reference(*inputs)
        if where == "made":  # each scalar a fresh host array, as `mx.array([v])` makes it
            inputs = [mx.array(a.tolist(), made_dtype or a.dtype) if n in scalar_names else a
                      for n, a in zip(t.inputs, inputs)]
        else:  # each a view into a longer array a GPU op wrote (device memory)
            inputs = [device_view(a) if n in scalar_names else a for n, a in zip(t.inputs, inputs)]
        mx.eval(inputs)
        rows.append({"case": f"{op_name} {params}", "scalars": where,
                     "max_abs_error": round(max_abs_error(launch(*inputs), want), 5),
                     **per_call(launch, inputs, calls)})
    inputs = op.make_inputs(shape, mx.float16, np.random.default_rng(0))
    mx.eval(inputs)
    # the built-in reads neither scalar (it takes them as arguments)
    rows.append({"case": f"{op_name} built-in", "scalars": "n/a", **per_call(op.baseline_for(shape), inputs, calls)})
    return rows


def device_view(a: mx.array) -> mx.array:
    """`a`'s values as the front of a 64-element array made by a GPU op (over the managed pool's 8 bytes)."""
    flat = a.reshape(-1)
    longer = mx.concatenate([flat, mx.zeros((64,), a.dtype)]) + mx.zeros((1,), a.dtype)
    return longer[: flat.size].reshape(a.shape)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--moe", action="store_true",
                    help="only moe_qgemv_combine at Qwen1.5-MoE's shape: its S scores as 8 bytes (fp16) against device memory")
    paths.output_options(ap)
    a = paths.parse_refusing_overwrite(ap, argv, outputs)
    if a.calls < 1:
        ap.error("--calls must be at least 1")
    return a


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    if a.moe:
        moe = {"S": 4, "E": 60, "N": 2048, "K": 1408, "G": 64}
        rows = []
        for params in ("CS=1,KS=1,PW=4,RPT=2,TEAMS=8,U=1", "CS=0,KS=1,PW=4,RPT=1,TEAMS=4,U=1"):
            rows += template_case("moe_qgemv_combine", "splitk", moe, params, {"scores"}, a.calls,
                                  made_dtype=mx.float16)
        return _report(a, rows)
    rows = scale_case(a.calls)
    qkv = {"NQ": 4096, "NK": 1024, "K": 4096, "G": 64, "D": 128}
    for params in ("KS=2,RPT=1,TEAMS=2,U=2,XS=0,TRIG=32", "KS=1,RPT=2,TEAMS=4,U=4,XS=0,TRIG=64"):
        rows += template_case("norm_qkv_rope", "splitk", qkv, params, {"eps", "offset"}, a.calls)
    rows += template_case("rms_norm", "rows", {"R": 1, "C": 4096}, "BLOCK=512,LB=16,REGS=1", {"eps"}, a.calls)
    _report(a, rows)


def _report(a, rows):
    for r in rows:
        print(json.dumps(r))
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "calls": a.calls, "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
