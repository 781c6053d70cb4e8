"""add_rms_norm: the residual add + RMSNorm of a transformer decoder block, as mlx-lm
computes it: h = x + r (rounded to the input dtype), y = mx.fast.rms_norm(h, w, eps),
over rows of (rows, cols); two outputs, h and y, both in the input dtype. Kernel inputs
x, r (R, C), w (C,), eps (1,) float32 (as rms_norm: any model's epsilon).

y is computed from the *rounded* h, so a fused kernel matches the unfused built-ins bit
for bit in h and within one rounding in y."""

import mlx.core as mx

from .rms_norm import EPS, eps_array, eps_input, normed
from .spec import Call, as_shape, dtype_name, random_array, rowwise


def add_rms_norm(x, r, weight, eps):
    """Residual add + RMSNorm of a decoder block: returns (h, y) with h = x + r, y = rms_norm(h).

    As mlx-lm writes it: h = x + r (in the inputs' dtype), y = mx.fast.rms_norm(h, weight, eps)."""
    h = x + r
    return h, mx.fast.rms_norm(h, weight, eps)


def _reference(x, r, w, eps):
    h = x + r  # in the input dtype: the rounding the built-in (and mlx-lm) applies
    return [h, normed(h, w, eps)]


def _builtin(x, r, w, eps):
    h = x + r
    return [h, mx.fast.rms_norm(h, w, eps.item())]


def _builtin_for(shape):
    def run(x, r, w, eps):
        h = x + r
        return [h, mx.fast.rms_norm(h, w, EPS)]
    return run


def bind(x, r, weight, eps, **_):
    if weight is None:
        return "tuned kernels need a weight"
    if not isinstance(eps, (int, float)) or not eps >= 0:
        return "eps must be a number >= 0"
    if not isinstance(r, mx.array) or r.shape != x.shape or r.dtype != x.dtype:
        return "the residual must be an mx.array of x's shape and dtype (no broadcasting or promotion)"
    c = x.shape[-1]
    if not isinstance(weight, mx.array) or weight.shape != (c,) or weight.dtype != x.dtype:
        return "weight must be a vector of the last dimension, in x's dtype"
    rows = x.size // c
    return Call([as_shape(x, (rows, c)), as_shape(r, (rows, c)), weight, eps_array(eps)], {"R": rows, "C": c},
                dtype_name(x.dtype), [x.shape, x.shape], finish=lambda outs: (outs[0], outs[1]))


OP = rowwise(
    "add_rms_norm",
    "x",
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype),
                                       random_array(rng, (s["R"], s["C"]), dtype),
                                       random_array(rng, (s["C"],), dtype),
                                       # large enough to matter: a kernel that ignores it fails
                                       eps_input(float(rng.choice([0.25, 1e-5])))],
    reference=_reference,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(s["R"], s["C"]), (s["R"], s["C"])],
    output_dtypes=lambda dtype: [dtype, dtype],
    # read x, r, w; write h, y
    bytes=lambda s, size: (4 * s["R"] * s["C"] + s["C"]) * size,
    flops=lambda s: 5 * s["R"] * s["C"],
    # decode (one token) and prefill (512 tokens) at Llama-3-8B / Qwen2-7B / 13B widths
    shapes=[{"R": 1, "C": 4096}, {"R": 512, "C": 4096}, {"R": 1, "C": 3584}, {"R": 512, "C": 3584},
            {"R": 512, "C": 5120}],
    emulator_shapes=[{"R": 8, "C": 512}, {"R": 5, "C": 96}],
    # C=1: one element; 1001: odd, no vector path; 1000: vector path with a partial last step
    edge_shapes=[{"R": 1, "C": 1}, {"R": 3, "C": 1001}, {"R": 2, "C": 1000}],
    bind=bind,
    function=add_rms_norm,
    export_outputs=["(R, C)", "(R, C)"],
    export_inputs=["(R, C)", "(R, C)", "(C,)", "(1,)"],
)
