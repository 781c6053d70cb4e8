"""Does the timing method defeat the L2? Times the gemv winner of the first H100 sweep and
`x @ w.T` with 2, 4, 8 and 16 rotating copies of the inputs, at two LLM shapes.

    python benchmarks/gemv_sets_probe.py      # on a GPU with MLX's CUDA back end

Writes nothing: the times go to stdout.

Run on the H100 on 2026-11-25 it showed our kernel reading a 117 MB weight at 5.2, 4.3, 4.2
and 2.97 TB/s (the built-in 3.2, 3.1, 3.2, 2.94): only ~2 GB of rotation gives DRAM numbers,
which is why hlh_mlx/timing.py rotates through 2 GB (benchmarks/results/llm_ops_h100.md).
"""

import mlx.core as mx
import numpy as np

from hlh_mlx import backends, ops, templates, timing, variants


def main():
    op = ops.get("gemv")
    t = next(t for t in templates.discover("gemv") if t.backend == "cuda")
    kernel = backends.Kernel(variants.make(t, {"WARPS": 2, "RPW": 4, "LB": 8, "UNROLL": 1}), "cuda")
    for shape in ({"M": 1, "N": 4096, "K": 14336}, {"M": 1, "N": 14336, "K": 4096}):
        rng = np.random.default_rng(0)
        nbytes = shape["N"] * shape["K"] * 2
        for n in (2, 4, 8, 16):
            sets = [op.make_inputs(shape, mx.float16, rng) for _ in range(n)]
            mx.eval(sets)
            for name, fn in (("ours", lambda *xs: kernel(list(xs), shape, "float16", op.output_shapes(shape),
                                                          [mx.float16])),
                             ("builtin", lambda *xs: op.baseline(*xs))):
                tm = timing.measure(fn, sets, cache_resident=False)
                print(shape, n, name, f"{tm.median_ms:.4f} ms {nbytes / tm.median_ms / 1e6:.0f} GB/s")
            del sets


if __name__ == "__main__":
    main()
