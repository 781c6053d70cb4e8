"""moe_qgemv_combine: the routed experts' down projections of an MoE block at decode and
the router-weighted sum of their outputs, in one op: out = sum_s scores[s] *
(y[s] @ dequantize(wd[e]).T) with e = indices[s], for the S experts chosen for one token;
y (S, K) (what moe_qgemv_swiglu gives), indices (S,) uint32 or int32, scores (S,) float32
(what moe_route gives) or in y's dtype, wd (E, N, K/8) uint32 with scales and biases (E, N, K/G) in y's dtype (mlx-lm's
QuantizedSwitchLinear); out (1, N). Built-in: what mlx-lm runs today, mx.gather_qmm, then
(d * scores).sum over the experts: three launches and the (S, N) products written and read.

Rounding: mlx-lm gets each expert's d rounded to the dtype (the gather's output), then
d * score rounded to the dtype (the multiply, of the score in the dtype: float32 scores
rounded to it first), summed in float32 and rounded once. The
reference and every kernel round the same way. An index outside [0, E) reads expert E - 1
(the kernels clamp)."""

import math

import mlx.core as mx
import numpy as np

from .moe_qgemv_swiglu import (EDGE_SHAPES, EMULATOR_SHAPES, INDEX_DTYPES, dequant32, expert_indices, expert_numbers,
                               expert_weights, stacked_experts_reason)
from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array, affine_4bit_reason


def _inputs(s, dtype, rng):
    n_sel = s["S"]
    # router weights as a softmax's top-k gives them: positive, below 1
    # in float32 as moe_route gives them, not rounded to the dtype: a kernel must round them
    scores = mx.softmax(random_array(rng, (n_sel + 2,), mx.float32), precise=True)[:n_sel]
    return [random_array(rng, (n_sel, s["K"]), dtype), expert_indices(rng, n_sel, s["E"]), scores,
            *expert_weights(rng, s["E"], s["N"], s["K"], s["G"], dtype)]


def _downs(y, idx, wd, sd, bd):
    return (dequant32(wd, sd, bd, idx) @ y.astype(mx.float32)[..., None])[..., 0]  # (S, N)


def _reference(y, idx, scores, wd, sd, bd):
    d = _downs(y, idx, wd, sd, bd).astype(y.dtype)
    p = (d.astype(mx.float32) * scores.astype(y.dtype).astype(mx.float32)[:, None]).astype(y.dtype)
    return [mx.sum(p.astype(mx.float32), axis=0, keepdims=True).astype(y.dtype)]


def _magnitude(y, idx, scores, wd, sd, bd):
    """Each expert's root sum of squares of its products, weighted by its score and summed
    as squares: the size the summation order's rounding scales with."""
    w2 = mx.square(dequant32(wd, sd, bd, idx))
    m2 = (w2 @ mx.square(y.astype(mx.float32))[..., None])[..., 0]  # (S, N)
    return [mx.sqrt(mx.sum(m2 * mx.square(scores.astype(y.dtype).astype(mx.float32))[:, None], axis=0, keepdims=True))]


def moe_qgemv_combine(y, indices, scores, wd, sd, bd, group_size=64, bits=4):
    """sum_s scores[s] * (y[s] @ Wd[indices[s]].T), as mlx-lm's MoE blocks compute it
    (SwitchGLU's down projection, mx.gather_qmm, then (d * scores).sum over the experts):
    y (..., S, K), indices and scores (..., S); out (..., N). Scores in float32 (moe_route's)
    multiply in y's dtype, as mlx-lm's own (the dtype's) do."""
    d = mx.gather_qmm(mx.expand_dims(y, -2), wd, sd, bd, rhs_indices=indices, transpose=True,
                      group_size=group_size, bits=bits).squeeze(-2)
    return (d * scores[..., None].astype(d.dtype)).sum(axis=-2)


def _builtin(y, idx, scores, wd, sd, bd):
    out = moe_qgemv_combine(y, idx, scores, wd, sd, bd, group_size=wd.shape[-1] * 8 // sd.shape[-1])
    return [out.reshape(1, -1)]


def bind(y, indices, scores, wd, sd, bd, group_size=64, bits=4):
    why = affine_4bit_reason(y, [(wd, sd, bd)], group_size, bits, "y")
    if why:
        return why
    if not isinstance(scores, mx.array) or scores.dtype not in (y.dtype, mx.float32):
        return f"scores must be float32 (moe_route's) or y's dtype {y.dtype} (got {getattr(scores, 'dtype', type(scores))})"
    if indices.dtype not in INDEX_DTYPES or indices.size == 0 or indices.ndim == 0:
        return f"indices must be uint32 or int32 expert numbers, at least one (got {indices.dtype}, {indices.size})"
    s, k = indices.size, y.shape[-1]
    if y.ndim < 2 or scores.ndim == 0:
        return "y (..., S, K) and scores (..., S): one row and one weight per chosen expert"
    try:
        rows = np.broadcast_shapes(y.shape[:-1], indices.shape, scores.shape)  # the built-in's
    except ValueError:
        return f"y {y.shape}, indices {indices.shape} and scores {scores.shape} do not broadcast"
    if math.prod(rows[:-1]) != 1 or rows[-1] != s or y.size != s * k or scores.size != s:
        return f"one token's experts only: y {y.shape}, indices {indices.shape}, scores {scores.shape}"
    experts = stacked_experts_reason("y", k, group_size, {"wd": wd}, (sd, bd))
    if isinstance(experts, str):
        return experts
    e, n = experts
    return Call([y, expert_numbers(indices), scores.reshape(-1), wd, sd, bd], {"S": s, "E": e, "N": n, "K": k, "G": group_size},
                dtype_name(y.dtype), [(*rows[:-1], n)])


def _bytes(s, size):
    n, k, g = s["N"], s["K"], s["G"]
    return s["S"] * (n * k // 2 + 2 * n * k // g * size + k * size + 4 + 4) + n * size


OP = OpSpec(
    name="moe_qgemv_combine",
    dims=("S", "E", "N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(1, s["N"])],
    # per expert qgemv's order effects, then the products each rounded as the built-in rounds them
    tolerance={**ROUNDED_ONCE, "float32": 3e-5},
    bytes=_bytes,
    flops=lambda s: s["S"] * (2 * s["N"] * s["K"] + 2 * s["N"]),
    # Qwen1.5-MoE-A2.7B (4 of 60 experts, G=64 and 128), Qwen3-30B-A3B (8 of 128)
    shapes=[{"S": 4, "E": 60, "N": 2048, "K": 1408, "G": 64}, {"S": 4, "E": 60, "N": 2048, "K": 1408, "G": 128},
            {"S": 8, "E": 128, "N": 2048, "K": 768, "G": 64}],
    emulator_shapes=EMULATOR_SHAPES,
    edge_shapes=EDGE_SHAPES,
    bind=bind,
    function=moe_qgemv_combine,
    export_dims={"S": "indices.shape[0]", "E": "wd.shape[0]", "N": "wd.shape[1]", "K": "y.shape[1]",
                 "G": "y.shape[1] // sd.shape[2]"},
    export_inputs=["(S, K)", "(S,)", "(S,)", "(E, N, K // 8)", "(E, N, K // G)", "(E, N, K // G)"],
    export_outputs=["(1, N)"],
)
