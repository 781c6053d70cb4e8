"""rms_norm: y = x / sqrt(mean(x^2, -1) + 1e-5) * w over rows of (rows, cols); built-in mx.fast.rms_norm."""

import mlx.core as mx

from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array

EPS = 1e-5


def _reference(x, w):
    x32 = x.astype(mx.float32)
    r = mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
    return [(x32 * r * w.astype(mx.float32)).astype(x.dtype)]


def bind(x, weight, eps, **_):
    if weight is None or abs(eps - EPS) > 1e-12:
        return f"tuned kernels use eps={EPS} and a weight"
    c = x.shape[-1]
    if weight.shape != (c,) or weight.dtype != x.dtype:
        return "weight must be a vector of the last dimension, in x's dtype"
    return Call([x.reshape(-1, c), weight], {"R": x.size // c, "C": c}, dtype_name(x.dtype),
                lambda o: o[0].reshape(x.shape))


OP = OpSpec(
    name="rms_norm",
    dims=("R", "C"),
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype),
                                       random_array(rng, (s["C"],), dtype)],
    reference=_reference,
    builtin=lambda x, w: [mx.fast.rms_norm(x, w, EPS)],
    output_shapes=lambda s: [(s["R"], s["C"])],
    tolerance=ROUNDED_ONCE,
    bytes=lambda s, size: (2 * s["R"] * s["C"] + s["C"]) * size,
    flops=lambda s: 4 * s["R"] * s["C"],
    shapes=[{"R": 8192, "C": 4096}, {"R": 1, "C": 4096}],
    emulator_shapes=[{"R": 8, "C": 512}],
    bind=bind,
    export_dims={"R": "x.shape[0]", "C": "x.shape[1]"},
    export_outputs=["(R, C)"],
    edge_shapes=[{"R": 1, "C": 1}, {"R": 3, "C": 1001}],
)
