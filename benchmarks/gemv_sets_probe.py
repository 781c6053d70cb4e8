import mlx.core as mx, numpy as np
from hlh_mlx import timing, templates, variants, backends, ops
op = ops.get("gemv")
t = [t for t in templates.discover("gemv") if t.backend == "cuda"][0]
v = variants.make(t, {"WARPS": 2, "RPW": 4, "LB": 8, "UNROLL": 1})
k = backends.Kernel(v, "cuda")
for shape in ({"M": 1, "N": 4096, "K": 14336}, {"M": 1, "N": 14336, "K": 4096}):
    rng = np.random.default_rng(0)
    for n in (2, 4, 8, 16):
        sets = [op.make_inputs(shape, mx.float16, rng) for _ in range(n)]
        mx.eval(sets)
        nb = shape["N"] * shape["K"] * 2
        for name, fn in (("ours", lambda *xs: k(list(xs), shape, "float16", op.output_shapes(shape), [mx.float16])),
                         ("builtin", lambda *xs: op.baseline(*xs))):
            tm = timing.measure(fn, sets, cache_resident=False)
            print(shape, n, name, f"{tm.median_ms:.4f} ms {nb / tm.median_ms / 1e6:.0f} GB/s")
        del sets
