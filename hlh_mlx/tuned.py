"""Tuned kernels as drop-in functions: `hlh_mlx.tuned.softmax(x)` and friends
(softmax, rms_norm, layer_norm, swiglu, gelu, matmul, gemv, quantized_matmul, rope,
scaled_dot_product_attention), with the arguments of the MLX function each replaces.

Each call runs the best stored variant for this device, back end, dtype and shape (the
exact shape if it was tuned, else the nearest tuned shape its variant supports), but only
where that variant beat the built-in *end to end* where it was measured: latency in a
dependent chain plus the host time of a call (`hlh_mlx.select`). Otherwise the MLX
built-in runs, and that is recorded: `explain(op, *args)` says what would run and why,
`fallbacks()` counts what did, and HLH_MLX_STRICT=1 turns a fallback into an error.

A call is decided once per signature (shapes, dtypes, other arguments) and then costs a
lookup and the kernel launch (`hlh_mlx.runtime`). Functions that call these work under
`mx.compile` and `mx.grad` (norms, SwiGLU and RoPE take the built-in's gradient).
"""

from __future__ import annotations

import mlx.core as mx

from . import runtime
from .runtime import Dispatch, FallbackError, explain, fallbacks, lenient  # noqa: F401  (public API)
from .select import MAX_EXTRAPOLATION, variant_of  # noqa: F401  (public API)


def refresh() -> None:
    """Forget decided calls, stored results, kernels, settings and fallback counts (after
    a sweep in this process, or after changing an HLH_MLX_* setting)."""
    runtime.refresh()


def _silu_mul(g, u):
    import mlx.nn as nn
    return nn.silu(g) * u


def _gelu(x):
    import mlx.nn as nn
    return nn.gelu(x)


def _gemv(x, w):
    return x @ w.T


# Each function is its op's Dispatch object itself: a call is the lookup of its signature
# and the plan, with no wrapper layer in between (a decode loop pays this ~50 times a token).
softmax = Dispatch("softmax", mx.softmax, doc="mx.softmax(x, axis=-1).")
rms_norm = Dispatch("rms_norm", mx.fast.rms_norm, differentiable=True,
                    doc="mx.fast.rms_norm(x, weight, eps); the gradient is the built-in's.")
layer_norm = Dispatch("layer_norm", mx.fast.layer_norm, differentiable=True,
                      doc="mx.fast.layer_norm(x, weight, bias, eps); the gradient is the built-in's.")
swiglu = Dispatch("swiglu", _silu_mul, differentiable=True,
                  doc="silu(g) * u; the gradient is the composed built-in's.")
rope = Dispatch("rope", mx.fast.rope, differentiable=True,
                doc="mx.fast.rope(x, dims, *, traditional, base, scale, offset, freqs=None); the offset travels "
                    "as data (one plan serves every decode step); the gradient is mx.fast.rope's own.")
gemv = Dispatch("gemv", _gemv, doc="x @ w.T for a few rows of x (what nn.Linear computes at decode).")
quantized_matmul = Dispatch("qgemv", mx.quantized_matmul,
                            doc="mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4); "
                                "tuned for one token, 4-bit affine weights, transpose=True.")
scaled_dot_product_attention = Dispatch("decode_attention", mx.fast.scaled_dot_product_attention,
                                        doc="mx.fast.scaled_dot_product_attention(q, k, v, *, scale, mask=None); "
                                            "tuned for one query token (decode).")
gelu = Dispatch("gelu", _gelu, doc="mlx.nn.gelu(x).")
matmul = Dispatch("matmul", mx.matmul, doc="mx.matmul(a, b).")
qgemv = quantized_matmul
decode_attention = scaled_dot_product_attention
