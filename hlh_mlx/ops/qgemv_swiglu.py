"""qgemv_swiglu: the gate and up projections of a Llama MLP at decode, fused with SwiGLU:
g = x @ dequantize(wg).T, u = x @ dequantize(wu).T, y = silu(g) * u, for one token x (1, K)
and two 4-bit affine quantized weights in MLX's format (as in qgemv: w_q (N, K/8) uint32,
scales and biases (N, K/G) in x's dtype). Built-in: what mlx-lm's MLP runs today, two
mx.quantized_matmul calls then nn.silu(g) * u, four launches where a kernel needs one.

Rounding: mlx-lm gets g and u each rounded to the dtype (the matmuls' outputs), then silu
and the product in the dtype. The reference (and every kernel) rounds g and u to the dtype
first, then computes silu(g) * u in float32 and rounds once: the same g and u as the model
sees, and one rounding fewer at the end."""

import math

import mlx.core as mx
import mlx.nn as nn

from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array, affine_4bit_reason



def _inputs(shape, dtype, rng):
    n, k, g = shape["N"], shape["K"], shape["G"]
    out = [random_array(rng, (1, k), dtype)]
    # the gate twice the up's scale: g ~ N(0, 4) reaches both silu's linear and its flat side
    for scale in (2.0, 1.0):
        w = random_array(rng, (n, k), dtype, scale / math.sqrt(k))
        out += list(mx.quantize(w, group_size=g, bits=4))
    return out


def _group(wq, scales):
    return wq.shape[1] * 8 // scales.shape[1]


def _gemv32(x, wq, scales, biases):
    w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=_group(wq, scales), bits=4)
    return x.astype(mx.float32) @ w.T


def _reference(x, wg, sg, bg, wu, su, bu):
    # g and u rounded to the dtype as the model's matmuls give them; silu(g) * u in float32, rounded once
    g = _gemv32(x, wg, sg, bg).astype(x.dtype).astype(mx.float32)
    u = _gemv32(x, wu, su, bu).astype(x.dtype).astype(mx.float32)
    return [(g * mx.sigmoid(g) * u).astype(x.dtype)]


def _magnitude(x, wg, sg, bg, wu, su, bu):
    """The size rounding error scales with: each gemv's error is proportional to the root sum
    of squares of its products (as qgemv's magnitude), and reaches y through
    dy = silu'(g) u dg + silu(g) du; a g or u that cancels to ~0 is not failed for that."""
    def mag(wq, scales, biases):
        w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32),
                          group_size=_group(wq, scales), bits=4)
        x32 = x.astype(mx.float32)
        return mx.sqrt((x32 * x32) @ (w * w).T)
    g, u = _gemv32(x, wg, sg, bg), _gemv32(x, wu, su, bu)
    sig = mx.sigmoid(g)
    dsilu = sig * (1 + g * (1 - sig))
    return [mx.sqrt(mx.square(dsilu * u * mag(wg, sg, bg)) + mx.square(g * sig * mag(wu, su, bu)))]


def qgemv_swiglu(x, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    """silu(x @ Wg.T) * (x @ Wu.T) with 4-bit affine quantized Wg, Wu: a Llama MLP's gate and up
    projections and SwiGLU, as mlx-lm computes them (two mx.quantized_matmul, nn.silu(g) * u)."""
    g = mx.quantized_matmul(x, wg, sg, bg, transpose=True, group_size=group_size, bits=bits)
    u = mx.quantized_matmul(x, wu, su, bu, transpose=True, group_size=group_size, bits=bits)
    return nn.silu(g) * u


def _builtin(x, wg, sg, bg, wu, su, bu):
    return [qgemv_swiglu(x, wg, sg, bg, wu, su, bu, group_size=_group(wg, sg), bits=4)]


def bind(x, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    why = affine_4bit_reason(x, [(wg, sg, bg), (wu, su, bu)], group_size, bits)
    if why:
        return why
    k = x.shape[-1]
    if x.size != k:
        return f"one token only ({x.size // k} rows given)"
    if k % group_size:
        return f"x's last dimension {k} is not a multiple of the group size {group_size}"
    n = wg.shape[0]
    if wg.shape != (n, k // 8) or wu.shape != wg.shape:
        return f"wg and wu must both be ({n}, {k // 8}) uint32 for x's last dimension {k}"
    if any(a.shape != (n, k // group_size) for a in (sg, bg, su, bu)):
        return f"scales and biases must be ({n}, {k // group_size}): x's last dimension over the group size"
    # x as given (one token under any leading 1-dims: the kernels read K from the weights)
    return Call([x, wg, sg, bg, wu, su, bu], {"N": n, "K": k, "G": group_size},
                dtype_name(x.dtype), [(*x.shape[:-1], n)])


def _bytes(s, size):
    n, k, g = s["N"], s["K"], s["G"]
    return 2 * (n * k // 2 + 2 * n * k // g * size) + k * size + n * size


OP = OpSpec(
    name="qgemv_swiglu",
    dims=("N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(1, s["N"])],
    # half: g, u and y each rounded as the reference rounds them (a g or u one ulp off
    # where the float32 sums straddle a rounding boundary); float32: two gemvs' summation
    # order (qgemv's 2e-5 each) combined through silu
    tolerance={**ROUNDED_ONCE, "float32": 3e-5},
    bytes=_bytes,
    flops=lambda s: 4 * s["N"] * s["K"] + 6 * s["N"],
    # Llama-3-8B (G=64 and 128), Qwen2.5-7B
    shapes=[{"N": 14336, "K": 4096, "G": 64}, {"N": 14336, "K": 4096, "G": 128}, {"N": 18944, "K": 3584, "G": 64}],
    emulator_shapes=[{"N": 64, "K": 512, "G": 64}, {"N": 64, "K": 512, "G": 128}],
    # the last: odd N and a ragged last step at a K the CUDA template's x staging (XS) and
    # split-K (KS=2) variants serve, so a GPU check covers those paths off the timed shapes
    edge_shapes=[{"N": 1, "K": 128, "G": 128}, {"N": 37, "K": 320, "G": 64}, {"N": 5, "K": 384, "G": 128},
                 {"N": 3, "K": 64, "G": 64}, {"N": 37, "K": 2560, "G": 64}],
    bind=bind,
    function=qgemv_swiglu,
    export_dims={"N": "wg.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // sg.shape[1]"},
    export_inputs=["(1, K)", "(N, K // 8)", "(N, K // G)", "(N, K // G)", "(N, K // 8)", "(N, K // G)",
                   "(N, K // G)"],
    export_outputs=["(1, N)"],
)
