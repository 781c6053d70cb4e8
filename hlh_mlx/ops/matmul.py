"""matmul: C = A @ B with A (M, K), B (K, N); reference mx.matmul."""

import math

import mlx.core as mx

from .spec import Call, OpSpec, dtype_name, random_array


def _inputs(shape, dtype, rng):
    # scaled so sums of K products stay O(1) in half precision
    s = 1.0 / math.sqrt(math.sqrt(shape["K"]))
    return [random_array(rng, (shape["M"], shape["K"]), dtype, s),
            random_array(rng, (shape["K"], shape["N"]), dtype, s)]


def bind(a, b, **_):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        return "tuned kernels take two 2-D matrices of one dtype"
    return Call([a, b], {"M": a.shape[0], "N": b.shape[1], "K": a.shape[1]}, dtype_name(a.dtype))


OP = OpSpec(
    name="matmul",
    dims=("M", "N", "K"),
    make_inputs=_inputs,
    reference=lambda a, b: [mx.matmul(a, b)],
    magnitude=lambda a, b: [mx.sqrt(mx.square(a.astype(mx.float32)) @ mx.square(b.astype(mx.float32)))],
    output_shapes=lambda s: [(s["M"], s["N"])],
    # normwise: f32 accumulation differs only in order; f16/bf16 add one output rounding
    tolerance={"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.5e-2},
    bytes=lambda s, size: (s["M"] * s["K"] + s["K"] * s["N"] + s["M"] * s["N"]) * size,
    flops=lambda s: 2 * s["M"] * s["N"] * s["K"],
    shapes=[{"M": 4096, "N": 4096, "K": 4096}, {"M": 1024, "N": 1024, "K": 1024}],
    emulator_shapes=[{"M": 64, "N": 64, "K": 64}],
    bind=bind,
    function=mx.matmul,
    export_dims={"M": "a.shape[0]", "K": "a.shape[1]", "N": "b.shape[1]"},
    export_outputs=["(M, N)"],
    edge_shapes=[{"M": 33, "N": 47, "K": 19}, {"M": 1, "N": 70, "K": 5}],
    bound="compute",
)
