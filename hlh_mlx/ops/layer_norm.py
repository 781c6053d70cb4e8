"""layer_norm: y = (x - mean) / sqrt(var + 1e-5) * w + b over rows of (rows, cols); built-in mx.fast.layer_norm."""

import mlx.core as mx

from .spec import Call, as_shape, dtype_name, random_array, rowwise

EPS = 1e-5


def _reference(x, w, b):
    x32 = x.astype(mx.float32)
    mean = mx.mean(x32, axis=-1, keepdims=True)
    var = mx.mean((x32 - mean) ** 2, axis=-1, keepdims=True)
    return [((x32 - mean) * mx.rsqrt(var + EPS) * w.astype(mx.float32) + b.astype(mx.float32)).astype(x.dtype)]


def bind(x, weight, bias, eps, **_):
    if weight is None or bias is None or abs(eps - EPS) > 1e-12:
        return f"tuned kernels use eps={EPS}, a weight and a bias"
    c = x.shape[-1]
    if weight.shape != (c,) or bias.shape != (c,) or not (weight.dtype == bias.dtype == x.dtype):
        return "weight and bias must be vectors of the last dimension, in x's dtype"
    return Call([as_shape(x, (x.size // c, c)), weight, bias], {"R": x.size // c, "C": c}, dtype_name(x.dtype),
                [x.shape])


OP = rowwise(
    "layer_norm",
    "x",
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype, 2.0),
                                       random_array(rng, (s["C"],), dtype), random_array(rng, (s["C"],), dtype)],
    reference=_reference,
    builtin=lambda x, w, b: [mx.fast.layer_norm(x, w, b, EPS)],
    bytes=lambda s, size: (2 * s["R"] * s["C"] + 2 * s["C"]) * size,
    flops=lambda s: 8 * s["R"] * s["C"],
    bind=bind,
    function=mx.fast.layer_norm,
)
