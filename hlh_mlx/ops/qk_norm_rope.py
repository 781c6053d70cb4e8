"""qk_norm_rope: the query and key norms of a Qwen3 attention and their RoPE at decode, in one
launch: each head of q (1, NQ) and of k (1, NK) (heads of D contiguous values) is RMS-normed
over its D values with its own weight (q_norm_w (D,) for q's heads, k_norm_w (D,) for k's,
one eps), then rotated by RoPE (non-traditional: within a head element i < D/2 pairs with
i + D/2) at position `offset`, angle theta_i = offset * (1 / freqs[i]), freqs (D/2,)
float32 in mx.fast.rope's `freqs=` convention (as norm_qkv_rope's).

Built-in (`function`): what mlx-lm's Qwen3 attention runs on q and k after their
projections, mx.fast.rms_norm over each head then mx.fast.rope: four launches where a kernel
needs one. In a patched Qwen3 block it follows norm_qkv_rope at offset 0 (the projections
without a rotation), so the block's attention input is two launches instead of ten.

Kernel inputs: q, k (contiguous, as given: (1, NQ) or heads first (1, H, 1, D)),
q_norm_w, k_norm_w (D,) in q's dtype, eps (1,) float32 (any model's epsilon, as rms_norm),
freqs (D/2,) float32, offset (1,) int32: the offset changes every decode step and travels
as data (OpSpec.dynamic, as rope's), so one plan serves every step. Outputs q and k in the
shapes given.

Rounding: as the built-ins round: each head normalised in float32 (x * rsqrt(mean(x^2) +
eps)), rounded to the dtype, times the weight rounded again (mx.fast.rms_norm rounds twice
so on every back end: the same bits but for the sum's order), then rotated in float32 and
rounded once (mx.fast.rope)."""

import mlx.core as mx

from .norm_qkv_rope import one_token_rope, rope_freqs
from .rms_norm import eps_array, eps_input, normed
from .rope import dynamic_offset, offset_input
from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array


def _inputs(shape, dtype, rng):
    nq, nk, d = shape["NQ"], shape["NK"], shape["D"]
    # projections' outputs are O(1) with heads of their own scale: the norm must divide each
    # head by its own rms (a kernel that normed over all of q, or not at all, fails)
    def heads(n):
        scales = mx.array(rng.uniform(0.3, 3.0, size=(1, n // d, 1)).astype("float32"))
        return (random_array(rng, (1, n // d, d), mx.float32) * scales).astype(dtype).reshape(1, n)
    # norm weights around 1, every element its own (a misplaced weight fails)
    w = [(1.0 + 0.3 * random_array(rng, (d,), mx.float32)).astype(dtype) for _ in range(2)]
    # eps large enough to matter next to mean(x^2) ~ 0.1-9 at 1.0, and Qwen3's 1e-6;
    # a small base so every pair turns by a visible angle even at small offsets
    return [heads(nq), heads(nk), *w, eps_input(float(rng.choice([1.0, 1e-6]))),
            rope_freqs(d, float(rng.choice([1000000.0, 100.0]))), offset_input(int(rng.integers(1, 4096)))]


def _rope32(y, freqs, offset):
    """RoPE of (1, H*D) float32 values, head by head: mx.fast.rope with freqs=, in float32."""
    d = 2 * freqs.size
    r = mx.fast.rope(y.reshape(1, -1, 1, d), d, traditional=False, base=None, scale=1.0,
                     offset=int(offset.item()), freqs=freqs)
    return r.reshape(1, -1)


def _normed(t, w, eps):
    """Each head of t (1, H*D) RMS-normed as mx.fast.rms_norm does it: x * rsqrt(mean(x^2) +
    eps) in float32 rounded to t's dtype, then times w rounded again (a product of two
    values of the dtype is exact in float32: one rounding, as the dtype's multiply)."""
    return normed(t.reshape(1, -1, w.size), w, eps, mlx_rounding=True).reshape(1, -1)


def _reference(q, k, q_norm_w, k_norm_w, eps, freqs, offset):
    return [_rope32(_normed(t, w, eps).astype(mx.float32), freqs, offset).astype(t.dtype)
            for t, w in ((q, q_norm_w), (k, k_norm_w))]


def qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, freqs, offset, head_dim):
    """Qwen3's query and key norms and RoPE: each head of q and of k (head_dim values, the
    last axis whole heads) through mx.fast.rms_norm with its weight, then mx.fast.rope with
    freqs= at `offset`; returns (q, k) in the shapes given."""
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"[qk_norm_rope] head_dim must be an even int >= 2 (got {head_dim!r})")

    def one(t, w):
        heads = t.reshape(-1, t.size // head_dim, 1, head_dim)  # (B, heads, T=1, D): one position
        n = mx.fast.rms_norm(heads, w, eps)
        r = mx.fast.rope(n, head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
        return r.reshape(t.shape)
    return one(q, q_norm_w), one(k, k_norm_w)


def _builtin(q, k, q_norm_w, k_norm_w, eps, freqs, offset):
    return list(qk_norm_rope(q, k, q_norm_w, k_norm_w, eps.item(), freqs, offset, 2 * freqs.size))


def _builtin_for(shape):
    d = shape["D"]

    def run(q, k, q_norm_w, k_norm_w, eps, freqs, offset):
        return list(qk_norm_rope(q, k, q_norm_w, k_norm_w, 1e-6, freqs, offset, d))
    return run


def bind(q, k, q_norm_w, k_norm_w, eps, freqs, offset, head_dim):
    arrays = {"q": q, "k": k, "q_norm_w": q_norm_w, "k_norm_w": k_norm_w}
    bad = [n for n, a in arrays.items() if not isinstance(a, mx.array)]
    if bad:
        return f"{', '.join(bad)} must be arrays"
    if q.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return f"q's dtype {q.dtype} has no tuned kernels"
    if any(a.dtype != q.dtype for a in arrays.values()):
        return "q, k and the norm weights must share one dtype"
    d = head_dim
    if not isinstance(d, int) or isinstance(d, bool) or d < 2 or d % 2:
        return f"head_dim must be an even int (got {d!r})"
    for name, t in (("q", q), ("k", k)):
        if t.ndim == 0 or t.size == 0 or t.shape[-1] % d:
            return f"{name}'s last dimension {t.shape[-1] if t.ndim else 0} is not whole heads of {d}"
        # one token of one sequence: (1, H*D), (1, 1, H*D), or heads first (1, H, 1, D)
        if t.size != t.shape[0] * t.shape[-1] and not (t.ndim == 4 and t.shape[2] == 1 and t.shape[3] == d):
            return f"{name} of shape {t.shape}: one token of one sequence ((1, H*D) or (1, H, 1, D))"
        if t.shape[0] != 1:
            return f"{name} holds {t.shape[0]} sequences: the kernels take one"
    for name, w in (("q_norm_w", q_norm_w), ("k_norm_w", k_norm_w)):
        if w.shape != (d,):
            return f"{name} must be ({d},): head_dim (got {w.shape})"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        return "eps must be a number >= 0"
    off = one_token_rope(freqs, offset, d)
    if isinstance(off, str):
        return off
    return Call([q, k, q_norm_w, k_norm_w, eps_array(eps), freqs, off],
                {"NQ": q.size, "NK": k.size, "D": d}, dtype_name(q.dtype),
                [q.shape, k.shape], finish=lambda outs: (outs[0], outs[1]))


def _bytes(s, size):
    # q and k read and written; the two norm weights; freqs
    return 2 * (s["NQ"] + s["NK"]) * size + 2 * s["D"] * size + s["D"] // 2 * 4


OP = OpSpec(
    name="qk_norm_rope",
    dims=("NQ", "NK", "D"),
    make_inputs=_inputs,
    reference=_reference,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(1, s["NQ"]), (1, s["NK"])],
    output_dtypes=lambda dtype: [dtype, dtype],
    # half: the norm's rounding (an element one ulp off where a float32 sum straddles a
    # rounding boundary), then the rotation's; float32: the angle (offsets up to 4096
    # radians carry float32 rounding of ~4096 * 6e-8; MLX's back ends compute sin and cos
    # differently: rope's 1e-4)
    tolerance={**ROUNDED_ONCE, "float32": 1e-4},
    bytes=_bytes,
    flops=lambda s: 10 * (s["NQ"] + s["NK"]),
    # Qwen3-8B (32 q heads, 8 kv heads of 128), Qwen3-30B-A3B (32, 4), Qwen3-0.6B/1.7B (16, 8)
    shapes=[{"NQ": 4096, "NK": 1024, "D": 128}, {"NQ": 4096, "NK": 512, "D": 128},
            {"NQ": 2048, "NK": 1024, "D": 128}],
    # GQA 2:1 at D=32; one q head per k head at D=128
    emulator_shapes=[{"NQ": 128, "NK": 64, "D": 32}, {"NQ": 256, "NK": 256, "D": 128}],
    # D=2 (one pair a head), 3 q heads on 1 k head, D=96 (D/2 not a power of two), D=256
    # (Gemma's), one head each
    edge_shapes=[{"NQ": 6, "NK": 2, "D": 2}, {"NQ": 24, "NK": 8, "D": 8},
                 {"NQ": 288, "NK": 96, "D": 96}, {"NQ": 512, "NK": 256, "D": 256}, {"NQ": 64, "NK": 64, "D": 64}],
    bind=bind,
    function=qk_norm_rope,
    dynamic={"offset": dynamic_offset},
    export_dims={"NQ": "q.size", "NK": "k.size", "D": "2 * freqs.shape[0]"},
    export_inputs=["(1, NQ)", "(1, NK)", "(D,)", "(D,)", "(1,)", "(D // 2,)", "(1,)"],
    export_outputs=["(1, NQ)", "(1, NK)"],
)
