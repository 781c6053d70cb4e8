"""rms_norm: y = x / sqrt(mean(x^2, -1) + eps) * w over rows of (rows, cols); built-in
mx.fast.rms_norm. Kernel inputs x (R, C), w (C,), eps (1,) float32: eps is data, so one
kernel serves every model's epsilon (Llama's 1e-5, Qwen's 1e-6)."""

import mlx.core as mx

from .spec import Call, as_shape, constant, dtype_name, input_constant, random_array, rowwise

EPS = 1e-5


def eps_array(eps) -> mx.array:
    """The eps a kernel reads: the runtime's device-resident constant."""
    return constant([eps], mx.float32)


def eps_input(eps) -> mx.array:
    """eps for an op's random inputs (a view of its own: spec.input_constant)."""
    return input_constant([eps], mx.float32)


def normed(x, w, eps, mlx_rounding: bool = False) -> mx.array:
    """The RMSNorm of x's last axis with weight w, computed in float32 (every op that norms
    refers to this): rounded once to x's dtype, or with `mlx_rounding` as mx.fast.rms_norm
    rounds on every back end: x * rsqrt(mean(x^2) + eps) to the dtype, then times w rounded
    again (a product of two values of the dtype is exact in float32: one rounding)."""
    x32 = x.astype(mx.float32)
    r = mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if mlx_rounding:
        return ((x32 * r).astype(x.dtype).astype(mx.float32) * w.astype(mx.float32)).astype(x.dtype)
    return (x32 * r * w.astype(mx.float32)).astype(x.dtype)


def _reference(x, w, eps):
    return [normed(x, w, eps)]


def bind(x, weight, eps, **_):
    if weight is None:
        return "tuned kernels need a weight"
    if not isinstance(eps, (int, float)) or not eps >= 0:
        return "eps must be a number >= 0"
    c = x.shape[-1]
    if weight.shape != (c,) or weight.dtype != x.dtype:
        return "weight must be a vector of the last dimension, in x's dtype"
    return Call([as_shape(x, (x.size // c, c)), weight, eps_array(eps)], {"R": x.size // c, "C": c},
                dtype_name(x.dtype), [x.shape])


OP = rowwise(
    "rms_norm",
    "x",
    # eps large enough to matter (mean(x^2) is about 1): a kernel that ignores it fails
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype),
                                       random_array(rng, (s["C"],), dtype),
                                       eps_input(float(rng.choice([0.25, 1e-5])))],
    reference=_reference,
    builtin=lambda x, w, eps: [mx.fast.rms_norm(x, w, eps.item())],
    builtin_for=lambda s: (lambda x, w, eps: [mx.fast.rms_norm(x, w, EPS)]),
    bytes=lambda s, size: (2 * s["R"] * s["C"] + s["C"]) * size,
    flops=lambda s: 4 * s["R"] * s["C"],
    bind=bind,
    function=mx.fast.rms_norm,
    export_inputs=["(R, C)", "(C,)", "(1,)"],
)
