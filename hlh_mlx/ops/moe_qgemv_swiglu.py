"""moe_qgemv_swiglu: the routed experts' gate and up projections of an MoE block at decode,
fused with SwiGLU: for each of the S experts e = indices[s] chosen for one token x (1, K),
y[s] = silu(x @ dequantize(wg[e]).T) * (x @ dequantize(wu[e]).T), with 4-bit affine
quantized expert weights in MLX's format stacked over E experts (as mlx-lm's
QuantizedSwitchLinear holds them: w_q (E, N, K/8) uint32, scales and biases (E, N, K/G) in x's
dtype); indices (S,) uint32 or int32; y (S, N). Built-in: what mlx-lm's SwitchGLU runs today,
two mx.gather_qmm calls then silu(g) * u.

Rounding as qgemv_swiglu: g and u rounded to the dtype (the gathers' outputs), silu(g) * u
in float32, rounded once. An index outside [0, E) reads expert E - 1 (the kernels clamp:
never a read outside the weights; the built-in's answer there is undefined)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array, affine_4bit_reason

INDEX_DTYPES = (mx.uint32, mx.int32)
# the small and awkward sizes both expert ops are checked at (S experts of E, N rows, K deep):
# one expert of one; odd N; K whose last step is ragged for the CUDA variants, one warp a
# row (1408) and two (2112: the split-K shared-memory sum)
EMULATOR_SHAPES = [{"S": 2, "E": 5, "N": 48, "K": 512, "G": 64}, {"S": 3, "E": 4, "N": 32, "K": 256, "G": 128}]
EDGE_SHAPES = [{"S": 1, "E": 1, "N": 1, "K": 128, "G": 128}, {"S": 2, "E": 3, "N": 37, "K": 320, "G": 64},
               {"S": 4, "E": 4, "N": 5, "K": 1408, "G": 64}, {"S": 2, "E": 3, "N": 9, "K": 2112, "G": 64}]


def stacked_experts_reason(x_name: str, k: int, group_size: int, packed: dict, scales_biases) -> str | tuple:
    """(E, N) of stacked 4-bit experts (`packed`, by name: (E, N, K // 8) each) with their
    scales and biases ((E, N, K // G)) for activations `x_name` of last dimension k, or why
    the kernels cannot take them: what both expert ops' binds check."""
    if k % group_size:
        return f"{x_name}'s last dimension {k} is not a multiple of the group size {group_size}"
    first_name, first = next(iter(packed.items()))
    if first.ndim != 3:
        return f"{first_name} must be stacked experts (E, N, K // 8)"
    e, n = first.shape[:2]
    if any(w.shape != (e, n, k // 8) for w in packed.values()):
        both = "both " if len(packed) > 1 else ""
        return f"{' and '.join(packed)} must {both}be ({e}, {n}, {k // 8}) uint32 for {x_name}'s last dimension {k}"
    if any(a.shape != (e, n, k // group_size) for a in scales_biases):
        return f"scales and biases must be ({e}, {n}, {k // group_size}): {x_name}'s last dimension over the group size"
    return e, n


def expert_numbers(indices) -> mx.array:
    """The chosen experts as the kernels read them: flat uint32 (the same bits: a negative
    index reads as one past E, which the kernels clamp)."""
    idx = indices.reshape(-1)
    return idx if idx.dtype == mx.uint32 else idx.view(mx.uint32)


def expert_indices(rng, s, e):
    """S distinct experts of E, as a router's top-k gives them (uint32, like mx.argpartition)."""
    return mx.array(rng.permutation(e)[:s].astype(np.uint32))


def expert_weights(rng, e, n, k, g, dtype, scale=1.0):
    """E experts' (N, K) weights, 4-bit affine quantized as mlx-lm stores them."""
    w = random_array(rng, (e, n, k), dtype, scale / math.sqrt(k))
    return list(mx.quantize(w, group_size=g, bits=4))


def dequant32(wq, scales, biases, indices):
    """The chosen experts' weights in float32, (S, N, K)."""
    idx = indices.astype(mx.int32)
    g = wq.shape[-1] * 8 // scales.shape[-1]
    return mx.dequantize(wq[idx], scales[idx].astype(mx.float32), biases[idx].astype(mx.float32),
                         group_size=g, bits=4)


def _inputs(s, dtype, rng):
    x = random_array(rng, (1, s["K"]), dtype)
    idx = expert_indices(rng, s["S"], s["E"])
    # the gate twice the up's scale: g ~ N(0, 4) reaches both silu's linear and its flat side
    return [x, idx, *expert_weights(rng, s["E"], s["N"], s["K"], s["G"], dtype, 2.0),
            *expert_weights(rng, s["E"], s["N"], s["K"], s["G"], dtype, 1.0)]


def _gemvs(x, idx, w, sc, b):
    return (dequant32(w, sc, b, idx) @ x.astype(mx.float32).reshape(-1, 1))[..., 0]  # (S, N)


def _reference(x, idx, wg, sg, bg, wu, su, bu):
    g = _gemvs(x, idx, wg, sg, bg).astype(x.dtype).astype(mx.float32)
    u = _gemvs(x, idx, wu, su, bu).astype(x.dtype).astype(mx.float32)
    return [(g * mx.sigmoid(g) * u).astype(x.dtype)]


def _magnitude(x, idx, wg, sg, bg, wu, su, bu):
    """qgemv_swiglu's magnitude per chosen expert: each gemv's root sum of squares of its
    products, carried to y through dy = silu'(g) u dg + silu(g) du."""
    x2 = mx.square(x.astype(mx.float32)).reshape(-1, 1)

    def mag(w, sc, b):
        return mx.sqrt((mx.square(dequant32(w, sc, b, idx)) @ x2)[..., 0])
    g, u = _gemvs(x, idx, wg, sg, bg), _gemvs(x, idx, wu, su, bu)
    sig = mx.sigmoid(g)
    dsilu = sig * (1 + g * (1 - sig))
    return [mx.sqrt(mx.square(dsilu * u * mag(wg, sg, bg)) + mx.square(g * sig * mag(wu, su, bu)))]


def moe_qgemv_swiglu(x, indices, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    """silu(x @ Wg[e].T) * (x @ Wu[e].T) for each expert e in `indices`, as mlx-lm's SwitchGLU
    computes it (x with two axes added, two mx.gather_qmm, silu(g) * u): y of shape
    broadcast(x.shape[:-1] + (1,), indices.shape) + (N,), one row per token and expert."""
    xe = mx.expand_dims(x, (-2, -3))
    kw = dict(rhs_indices=indices, transpose=True, group_size=group_size, bits=bits)
    g = mx.gather_qmm(xe, wg, sg, bg, **kw)
    u = mx.gather_qmm(xe, wu, su, bu, **kw)
    return (nn.silu(g) * u).squeeze(-2)


def _builtin(x, idx, wg, sg, bg, wu, su, bu):
    y = moe_qgemv_swiglu(x, idx, wg, sg, bg, wu, su, bu, group_size=wg.shape[-1] * 8 // sg.shape[-1])
    return [y.reshape(idx.size, -1)]


def bind(x, indices, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    why = affine_4bit_reason(x, [(wg, sg, bg), (wu, su, bu)], group_size, bits)
    if why:
        return why
    if indices.dtype not in INDEX_DTYPES or indices.size == 0:
        return f"indices must be uint32 or int32 expert numbers, at least one (got {indices.dtype}, {indices.size})"
    k = x.shape[-1]
    if x.size != k:
        return f"one token only ({x.size // max(k, 1)} rows given)"
    experts = stacked_experts_reason("x", k, group_size, {"wg": wg, "wu": wu}, (sg, bg, su, bu))
    if isinstance(experts, str):
        return experts
    e, n = experts
    lead = np.broadcast_shapes((*x.shape[:-1], 1), indices.shape)  # the built-in's rows: one per expert
    if math.prod(lead) != indices.size:
        return f"one token's experts only: x {x.shape} and indices {indices.shape} make {math.prod(lead)} rows"
    idx = expert_numbers(indices)
    return Call([x, idx, wg, sg, bg, wu, su, bu], {"S": idx.size, "E": e, "N": n, "K": k, "G": group_size},
                dtype_name(x.dtype), [(*lead, n)])


def _bytes(s, size):
    n, k, g = s["N"], s["K"], s["G"]
    return s["S"] * 2 * (n * k // 2 + 2 * n * k // g * size) + k * size + s["S"] * (n * size + 4)


OP = OpSpec(
    name="moe_qgemv_swiglu",
    dims=("S", "E", "N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(s["S"], s["N"])],
    # qgemv_swiglu's: the same sums per expert
    tolerance={**ROUNDED_ONCE, "float32": 3e-5},
    bytes=_bytes,
    flops=lambda s: s["S"] * (4 * s["N"] * s["K"] + 6 * s["N"]),
    # Qwen1.5-MoE-A2.7B (4 of 60 experts, G=64 and 128), Qwen3-30B-A3B (8 of 128)
    shapes=[{"S": 4, "E": 60, "N": 1408, "K": 2048, "G": 64}, {"S": 4, "E": 60, "N": 1408, "K": 2048, "G": 128},
            {"S": 8, "E": 128, "N": 768, "K": 2048, "G": 64}],
    emulator_shapes=EMULATOR_SHAPES,
    edge_shapes=EDGE_SHAPES,
    bind=bind,
    function=moe_qgemv_swiglu,
    export_dims={"S": "indices.shape[0]", "E": "wg.shape[0]", "N": "wg.shape[1]", "K": "x.shape[1]",
                 "G": "x.shape[1] // sg.shape[2]"},
    export_inputs=["(1, K)", "(S,)", "(E, N, K // 8)", "(E, N, K // G)", "(E, N, K // G)", "(E, N, K // 8)",
                   "(E, N, K // G)", "(E, N, K // G)"],
    export_outputs=["(S, N)"],
)
