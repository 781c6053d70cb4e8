"""gemv: y = x @ w.T with x (M, K), M small (decode), w (N, K) as nn.Linear stores it;
built-in: `x @ w.T`, what nn.Linear runs."""

import math

import mlx.core as mx

from .spec import ROUNDED_ONCE, Call, as_shape, OpSpec, dtype_name, random_array

MAX_M = 8  # more rows than this is a matmul: the tuned gemv declines


def _inputs(shape, dtype, rng):
    s = 1.0 / math.sqrt(math.sqrt(shape["K"]))
    return [random_array(rng, (shape["M"], shape["K"]), dtype, s),
            random_array(rng, (shape["N"], shape["K"]), dtype, s)]


def bind(x, w, **_):
    if w.ndim != 2 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        return "x (..., K) and w (N, K) of one dtype"
    m = x.size // x.shape[-1]
    if m > MAX_M:
        return f"{m} rows is a matmul, not a gemv (tuned gemv takes at most {MAX_M})"
    n = w.shape[0]
    return Call([as_shape(x, (m, x.shape[-1])), w], {"M": m, "N": n, "K": w.shape[1]}, dtype_name(x.dtype),
                [(*x.shape[:-1], n)])



def _x_wt(x, w):
    return x @ w.T


OP = OpSpec(
    name="gemv",
    dims=("M", "N", "K"),
    make_inputs=_inputs,
    reference=lambda x, w: [(x.astype(mx.float32) @ w.astype(mx.float32).T).astype(x.dtype)],
    magnitude=lambda x, w: [mx.sqrt(mx.square(x.astype(mx.float32)) @ mx.square(w.astype(mx.float32)).T)],
    builtin=lambda x, w: [x @ w.T],
    output_shapes=lambda s: [(s["M"], s["N"])],
    tolerance={**ROUNDED_ONCE, "float32": 2e-5},
    bytes=lambda s, size: (s["N"] * s["K"] + s["M"] * s["K"] + s["M"] * s["N"]) * size,
    flops=lambda s: 2 * s["M"] * s["N"] * s["K"],
    shapes=[{"M": 1, "N": 14336, "K": 4096}, {"M": 1, "N": 4096, "K": 14336}, {"M": 1, "N": 4096, "K": 4096}],
    emulator_shapes=[{"M": 1, "N": 64, "K": 512}],
    edge_shapes=[{"M": 1, "N": 1, "K": 1}, {"M": 3, "N": 37, "K": 1001}],
    bind=bind,
    function=_x_wt,
    export_dims={"M": "x.shape[0]", "K": "x.shape[1]", "N": "w.shape[0]"},
    export_outputs=["(M, N)"],
)
