"""rms_norm: y = x / sqrt(mean(x^2, -1) + 1e-5) * w over rows of (rows, cols); built-in mx.fast.rms_norm."""

import mlx.core as mx

from .spec import Call, as_shape, dtype_name, random_array, rowwise

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
    return Call([as_shape(x, (x.size // c, c)), weight], {"R": x.size // c, "C": c}, dtype_name(x.dtype),
                [x.shape])


OP = rowwise(
    "rms_norm",
    "x",
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype),
                                       random_array(rng, (s["C"],), dtype)],
    reference=_reference,
    builtin=lambda x, w: [mx.fast.rms_norm(x, w, EPS)],
    bytes=lambda s, size: (2 * s["R"] * s["C"] + s["C"]) * size,
    flops=lambda s: 4 * s["R"] * s["C"],
    bind=bind,
    function=mx.fast.rms_norm,
    differentiable=True,
)
