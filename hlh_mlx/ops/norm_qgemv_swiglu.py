"""norm_qgemv_swiglu: a Llama MLP at decode with its input RMSNorm fused in the prologue:
y = mx.fast.rms_norm(x, norm_w, eps) (rounded to the dtype, as the built-in returns it), then
qgemv_swiglu on y: silu(y @ dequantize(wg).T) * (y @ dequantize(wu).T), for one token x (1, K)
and two 4-bit affine quantized weights in MLX's format (w_q (N, K/8) uint32, scales and biases
(N, K/G) in x's dtype, G in (64, 128)). Kernel inputs x (1, K), norm_w (K,), eps (1,) float32
(as rms_norm: eps is data, one kernel serves every model's epsilon), wg, sg, bg, wu, su, bu.
Built-in: what mlx-lm runs today, mx.fast.rms_norm then qgemv_swiglu's composition (two
mx.quantized_matmul, nn.silu(g) * u): five launches where a kernel needs one.

Rounding: y as rms_norm's reference gives it (x * rsqrt(mean(x^2) + eps) * norm_w in float32,
rounded once to the dtype), then exactly qgemv_swiglu's rounding applied to y (g and u
rounded to the dtype, silu(g) * u in float32, rounded once)."""

import mlx.core as mx

from . import qgemv_swiglu as _qs
from .qgemv_swiglu import qgemv_swiglu
from .rms_norm import EPS, eps_array, eps_input, normed
from .spec import ROUNDED_ONCE, Call, OpSpec, random_array

# x ~ N(0, 9): a kernel that skipped the normalisation (or its rsqrt) would be 3x off
X_SCALE = 3.0
# eps drawn from these: 2.0 matters next to mean(x^2) ~ 9 (a kernel that ignores eps is ~10%
# off), 1e-5 is Llama's
EPS_CHOICES = (2.0, 1e-5)


def _inputs(shape, dtype, rng):
    k = shape["K"]
    qs = _qs.OP.make_inputs(shape, dtype, rng)  # x, wg, sg, bg, wu, su, bu
    x = random_array(rng, (1, k), dtype, X_SCALE)
    # around 1 as a trained norm weight, but every element its own: a kernel that drops or
    # misplaces norm_w fails
    w = mx.array((1.0 + 0.5 * rng.standard_normal(k)).astype("float32")).astype(dtype)
    return [x, w, eps_input(float(rng.choice(EPS_CHOICES))), *qs[1:]]


def _normed(x, w, eps):
    """rms_norm's reference: float32, rounded once to x's dtype (mx.fast.rms_norm rounds
    x * rsqrt(...) before the weight too: an ulp apart in about one element of four in half
    precision, within the tolerance)."""
    return normed(x, w, eps)


def _reference(x, w, eps, wg, sg, bg, wu, su, bu):
    return _qs.OP.reference(_normed(x, w, eps), wg, sg, bg, wu, su, bu)


def _magnitude(x, w, eps, wg, sg, bg, wu, su, bu):
    return _qs.OP.magnitude(_normed(x, w, eps), wg, sg, bg, wu, su, bu)


def norm_qgemv_swiglu(x, norm_w, eps, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    """silu(y @ Wg.T) * (y @ Wu.T) with y = rms_norm(x, norm_w, eps) and 4-bit affine quantized
    Wg, Wu: a Llama MLP's input norm, gate and up projections and SwiGLU, as mlx-lm computes
    them (mx.fast.rms_norm, two mx.quantized_matmul, nn.silu(g) * u)."""
    return qgemv_swiglu(mx.fast.rms_norm(x, norm_w, eps), wg, sg, bg, wu, su, bu, group_size=group_size, bits=bits)


def _builtin(x, w, eps, wg, sg, bg, wu, su, bu):
    return [norm_qgemv_swiglu(x, w, eps.item(), wg, sg, bg, wu, su, bu, group_size=_qs._group(wg, sg), bits=4)]


def _builtin_for(shape):
    g = shape["G"]

    def run(x, w, eps, wg, sg, bg, wu, su, bu):
        return [norm_qgemv_swiglu(x, w, EPS, wg, sg, bg, wu, su, bu, group_size=g, bits=4)]
    return run


def bind(x, norm_w, eps, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        return "eps must be a number >= 0"
    if norm_w is None:
        return "tuned kernels need a norm weight"
    # everything qgemv_swiglu's kernels need, with x in y's place (same shape and dtype)
    call = _qs.bind(x, wg, sg, bg, wu, su, bu, group_size=group_size, bits=bits)
    if isinstance(call, str):
        return call
    k = x.shape[-1]
    if not isinstance(norm_w, mx.array) or norm_w.shape != (k,) or norm_w.dtype != x.dtype:
        return f"norm_w must be a ({k},) vector in x's dtype"
    xk, *ws = call.inputs
    return Call([xk, norm_w, eps_array(eps), *ws], call.shape, call.dtype, call.out_shapes)


def _bytes(s, size):
    # qgemv_swiglu's traffic, plus norm_w and eps
    return _qs.OP.bytes(s, size) + s["K"] * size + 4


OP = OpSpec(
    name="norm_qgemv_swiglu",
    dims=("N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(1, s["N"])],
    # qgemv_swiglu's: y rounded as the reference rounds it (a y one ulp off where the rsqrt's
    # summation order straddles a rounding boundary is within the half tolerances)
    tolerance={**ROUNDED_ONCE, "float32": 3e-5},
    bytes=_bytes,
    flops=lambda s: 4 * s["N"] * s["K"] + 6 * s["N"] + 4 * s["K"],
    # Llama-3-8B (G=64 and 128), Qwen2.5-7B
    shapes=[{"N": 14336, "K": 4096, "G": 64}, {"N": 14336, "K": 4096, "G": 128}, {"N": 18944, "K": 3584, "G": 64}],
    emulator_shapes=[{"N": 64, "K": 512, "G": 64}, {"N": 64, "K": 512, "G": 128}],
    # qgemv_swiglu's edge shapes (odd N, one step, a ragged last step where the CUDA
    # template's XS=4096 serves), and K=4608 with a ragged last step where XS=8192 serves
    edge_shapes=[{"N": 1, "K": 128, "G": 128}, {"N": 37, "K": 320, "G": 64}, {"N": 5, "K": 384, "G": 128},
                 {"N": 3, "K": 64, "G": 64}, {"N": 37, "K": 2560, "G": 64}, {"N": 9, "K": 4608, "G": 128}],
    bind=bind,
    function=norm_qgemv_swiglu,
    export_dims={"N": "wg.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // sg.shape[1]"},
    export_inputs=["(1, K)", "(K,)", "(1,)", "(N, K // 8)", "(N, K // G)", "(N, K // G)", "(N, K // 8)",
                   "(N, K // G)", "(N, K // G)"],
    export_outputs=["(1, N)"],
)
