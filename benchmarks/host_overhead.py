"""Host time per call (building the graph, no evaluation) of a built-in, of the same op
through hlh_mlx.tuned, and of the tuned variant's kernel object called directly.

    python benchmarks/host_overhead.py [--small]   # microseconds per call, JSON last

(--small: a 256x512 weight, for a smoke run on a CPU.)

A decode loop is host-bound when its GPU work per token is shorter than the Python and
MLX work that builds it; there a tuned kernel that saves GPU time can still slow the loop
down. This says where the host time of one tuned call goes: hlh_mlx's Python (binding,
choosing, caching) or the custom-kernel call in MLX itself.
"""

import json
import sys
import time

import mlx.core as mx
import numpy as np

from hlh_mlx import ops, tuned

CALLS = 2000


def per_call_us(fn) -> float:
    outs = [fn() for _ in range(10)]
    mx.eval(outs)
    best = float("inf")
    for _ in range(5):
        outs = []
        t = time.perf_counter()
        for _ in range(CALLS):
            outs.append(fn())
        best = min(best, (time.perf_counter() - t) / CALLS * 1e6)
        mx.eval(outs)
    return best


def main():
    rng = np.random.default_rng(0)
    res = {"device": mx.device_info().get("device_name", "?"), "mlx": mx.__version__}
    shape = {"N": 256, "K": 512, "G": 64} if "--small" in sys.argv else {"N": 14336, "K": 4096, "G": 64}
    x, w, s, b = ops.get("qgemv").make_inputs(shape, mx.float16, rng)
    mx.eval(x, w, s, b)
    res["mx.quantized_matmul"] = per_call_us(lambda: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4))
    res["tuned.quantized_matmul"] = per_call_us(lambda: tuned.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4))
    res["explain"] = tuned.explain("qgemv", x, w, s, b)
    choice = tuned.choose("qgemv", ops.get("qgemv").bind(x, w, s, b))
    if choice.variant is not None:
        op = ops.get("qgemv")
        call = op.bind(x, w, s, b)
        kernel, out_shapes, out_dtypes = tuned._launch_for(op, call, choice)
        res["kernel object call"] = per_call_us(lambda: kernel(call.inputs, call.shape, call.dtype, out_shapes, out_dtypes))
        raw, (grid, targs, tg) = kernel._kernel, kernel._launch[(tuple(call.shape.items()), call.dtype)]
        res["mx.fast.cuda_kernel call"] = per_call_us(lambda: raw(inputs=call.inputs, template=targs, grid=grid, threadgroup=tg,
                                                                  output_shapes=out_shapes, output_dtypes=out_dtypes))
    xr = mx.random.normal((1, 1, shape["K"])).astype(mx.float16)
    wr = mx.ones((shape["K"],), dtype=mx.float16)
    res["mx.fast.rms_norm"] = per_call_us(lambda: mx.fast.rms_norm(xr, wr, 1e-5))
    res["tuned.rms_norm (fallback)"] = per_call_us(lambda: tuned.rms_norm(xr, wr, 1e-5))
    for k, v in res.items():
        print(f"{k}: {v:.2f} us" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
