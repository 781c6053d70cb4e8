"""norm_qkv_rope: the attention input of a Llama decoder block at decode, in one launch:
h = rms_norm(x, norm_w, eps) (in float32, rounded once to the dtype; mx.fast.rms_norm also
rounds before the weight, an ulp apart in about one element of four in half precision);
q, k, v = h @ dequantize(W).T for three 4-bit affine quantized weights in MLX's format (as
qgemv: w (N, K/8) uint32, scales and biases (N, K/G) in x's dtype, one group size G), each
rounded to the dtype as mx.quantized_matmul returns it; then RoPE (non-traditional: within
a head of D, element i < D/2 pairs with i + D/2) on q and k at position `offset`, angle
theta_i = offset * (1 / freqs[i]) with freqs (D/2,) float32 in mx.fast.rope's `freqs=`
convention (base=None, scale=1: for base b, freqs[i] = b ** (2i / D)). v is not rotated.
With B=1 each projection adds a bias (Qwen2's q/k/v projections do; Llama's, B=0, do not),
after the matmul's rounding and before RoPE, as mlx-lm's QuantizedLinear adds it. B is a
dimension, not a detail of the inputs, so a Llama call is timed against the built-ins a
Llama block runs (no adds) and a Qwen2 call against three more launches.
Outputs q (1, NQ), k (1, NK), v (1, NK), heads contiguous.

Built-in (`function`): what mlx-lm's Llama attention runs today, mx.fast.rms_norm, three
mx.quantized_matmul and two mx.fast.rope: six launches where a kernel needs one.

Kernel inputs: x (1, K), norm_w (K,), eps (1,) float32 (any model's epsilon, as rms_norm),
wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs (D/2,) float32, offset (1,) int32, and the
projections' biases q_bias (NQ,), k_bias (NK,), v_bias (NK,) in x's dtype (zeros at B=0,
never read there). The offset
changes every decode step: it travels as data (OpSpec.dynamic, as rope's), so one plan
serves every step.

Rounding: the reference (and every kernel) rounds h to the dtype, each gemv's float32 sum to
the dtype, that plus its bias to the dtype, then rotates the rounded q and k in float32 and rounds once more: the h, q, k
and v the model sees, and the rope the built-in applies to them."""

import math

import mlx.core as mx

from .rms_norm import eps_array, eps_input, normed
from .rope import dynamic_offset, offset_as_data, offset_input
from .spec import ROUNDED_ONCE, Call, OpSpec, affine_4bit_reason, dtype_name, input_constant, random_array, zeros

BASE = 10000.0


def rope_freqs(d: int, base: float = BASE) -> mx.array:
    """mx.fast.rope's `freqs=` for a base: base ** (2i / D), float32 (the caller folds a
    scale into them: freqs / scale)."""
    return input_constant([base ** (2 * i / d) for i in range(d // 2)], mx.float32)


def _inputs(shape, dtype, rng):
    nq, nk, k, g, d, b = (shape[n] for n in ("NQ", "NK", "K", "G", "D", "B"))
    x = random_array(rng, (1, k), dtype)
    # norm weights around 1 (as trained models' are), never zero
    out = [x, (1.0 + 0.2 * random_array(rng, (k,), mx.float32)).astype(dtype),
           # large enough to matter next to mean(x^2) ~ 1: a kernel that ignores it fails
           eps_input(float(rng.choice([0.25, 1e-5])))]
    for n in (nq, nk, nk):
        w = random_array(rng, (n, k), dtype, 1.0 / math.sqrt(k))
        out += list(mx.quantize(w, group_size=g, bits=4))
    # a small base so every pair turns by a visible angle even at small offsets
    out += [rope_freqs(d, float(rng.choice([10000.0, 100.0]))),
            offset_input(int(rng.integers(1, 4096)))]
    # biases as large as the products (~1): a kernel that drops or misplaces one fails
    return out + [random_array(rng, (n,), dtype) if b else mx.zeros((n,), dtype) for n in (nq, nk, nk)]


def _group(wq, scales):
    return wq.shape[1] * 8 // scales.shape[1]


def _norm(x, norm_w, eps):
    return normed(x, norm_w, eps)


def _gemv32(h, wq, scales, biases):
    w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=_group(wq, scales), bits=4)
    return h.astype(mx.float32) @ w.T


def _rope32(q, freqs, offset):
    """RoPE of (1, H*D) float32 values, head by head: mx.fast.rope with freqs=, in float32."""
    d = 2 * freqs.size
    r = mx.fast.rope(q.reshape(1, -1, 1, d), d, traditional=False, base=None, scale=1.0,
                     offset=int(offset.item()), freqs=freqs)
    return r.reshape(1, -1)


def _reference(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, q_bias, k_bias, v_bias):
    h = _norm(x, norm_w, eps)
    q, k, v = ((_gemv32(h, *w).astype(x.dtype).astype(mx.float32) + b.astype(mx.float32)).astype(x.dtype)
               for w, b in (((wq, sq, bq), q_bias), ((wk, sk, bk), k_bias), ((wv, sv, bv), v_bias)))
    return [_rope32(q.astype(mx.float32), freqs, offset).astype(x.dtype),
            _rope32(k.astype(mx.float32), freqs, offset).astype(x.dtype), v]


def _magnitude(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, q_bias, k_bias, v_bias):
    """Each gemv's rounding error scales with the root sum of squares of its products (as
    qgemv's) and, once the bias is added, with the bias too; the rotation mixes a pair's two
    errors with weights cos^2 and sin^2."""
    h = _norm(x, norm_w, eps).astype(mx.float32)

    def mag(wq, scales, biases, bias):
        w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32),
                          group_size=_group(wq, scales), bits=4)
        return (h * h) @ (w * w).T + mx.square(bias.astype(mx.float32))

    half = freqs.size
    theta = offset.astype(mx.float32) * (1.0 / freqs)
    c2, s2 = mx.square(mx.cos(theta)), mx.square(mx.sin(theta))

    def rotated(m2):
        m2 = m2.reshape(-1, 2, half)
        a, b = m2[:, 0], m2[:, 1]
        return mx.sqrt(mx.stack([c2 * a + s2 * b, s2 * a + c2 * b], axis=1)).reshape(1, -1)
    return [rotated(mag(wq, sq, bq, q_bias)), rotated(mag(wk, sk, bk, k_bias)), mx.sqrt(mag(wv, sv, bv, v_bias))]


def norm_qkv_rope(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, head_dim,
                  group_size=64, bits=4, heads_first=False, q_bias=None, k_bias=None, v_bias=None):
    """RMSNorm, the q/k/v 4-bit projections (each with its bias, if given) and RoPE of q and
    k: a Llama or Qwen2 attention's input at decode, as mlx-lm computes it (mx.fast.rms_norm,
    three mx.quantized_matmul, the biases added, mx.fast.rope with freqs= on heads of
    head_dim); returns (q, k, v), each (..., H * head_dim), or with heads_first (one token)
    each (1, H, 1, head_dim), the layout attention takes."""
    h = mx.fast.rms_norm(x, norm_w, eps)

    def project(w, s, b, bias):
        y = mx.quantized_matmul(h, w, s, b, transpose=True, group_size=group_size, bits=bits)
        return y if bias is None else y + bias
    q, k, v = project(wq, sq, bq, q_bias), project(wk, sk, bk, k_bias), project(wv, sv, bv, v_bias)

    def rope(t):
        r = mx.fast.rope(t.reshape(-1, t.shape[-1] // head_dim, 1, head_dim), head_dim, traditional=False,
                         base=None, scale=1.0, offset=offset, freqs=freqs)
        return r if heads_first else r.reshape(t.shape)
    return rope(q), rope(k), v.reshape(1, -1, 1, head_dim) if heads_first else v


def _builtin(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, q_bias, k_bias, v_bias):
    return list(norm_qkv_rope(x, norm_w, eps.item(), wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs,
                              offset, 2 * freqs.size, group_size=_group(wq, sq),
                              q_bias=q_bias, k_bias=k_bias, v_bias=v_bias))


def _builtin_for(shape):
    d, g, b = shape["D"], shape["G"], shape["B"]

    def run(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, q_bias, k_bias, v_bias):
        biases = dict(q_bias=q_bias, k_bias=k_bias, v_bias=v_bias) if b else {}  # B=0: no adds
        return list(norm_qkv_rope(x, norm_w, 1e-5, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, d,
                                  group_size=g, **biases))
    return run


def bind(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, head_dim, group_size=64, bits=4,
         heads_first=False, q_bias=None, k_bias=None, v_bias=None):
    why = affine_4bit_reason(x, [(wq, sq, bq), (wk, sk, bk), (wv, sv, bv)], group_size, bits,
                             same_dtype={"norm_w": norm_w})
    if why:
        return why
    if not isinstance(eps, (int, float)) or not eps >= 0:
        return "eps must be a number >= 0"
    k = x.shape[-1]
    if x.size != k:
        return f"one token only ({x.size // k} rows given)"
    if norm_w.shape != (k,):
        return f"norm_w must be ({k},): x's last dimension"
    if k % group_size:
        return f"x's last dimension {k} is not a multiple of the group size {group_size}"
    nq, nk = wq.shape[0], wk.shape[0]
    if wv.shape[0] != nk:
        return f"wv has {wv.shape[0]} rows and wk {nk}: v and k must have the same rows"
    for name, w, s, b in (("wq", wq, sq, bq), ("wk", wk, sk, bk), ("wv", wv, sv, bv)):
        n = w.shape[0]
        if w.shape != (n, k // 8):
            return f"{name} must be ({n}, {k // 8}) uint32 for x's last dimension {k}"
        if s.shape != (n, k // group_size) or b.shape != s.shape:
            return f"{name}'s scales and biases must be ({n}, {k // group_size}): x's last dimension over the group size"
    d = head_dim
    if not isinstance(d, int) or d < 2 or d % 2:
        return f"head_dim must be even (got {d})"
    if nq % d or nk % d:
        return f"head_dim {d} must divide the q rows {nq} and the k rows {nk}"
    off = one_token_rope(freqs, offset, d)
    if isinstance(off, str):
        return off
    if not isinstance(heads_first, bool):
        return f"heads_first must be True or False (got {heads_first!r})"
    biases, given = [], q_bias is not None or k_bias is not None or v_bias is not None
    for name, b, n in (("q_bias", q_bias, nq), ("k_bias", k_bias, nk), ("v_bias", v_bias, nk)):
        if b is None:
            biases.append(zeros(n, x.dtype))  # adding zero changes no value
        elif not isinstance(b, mx.array) or b.shape != (n,) or b.dtype != x.dtype:
            return f"{name} must be ({n},) in x's dtype {x.dtype}" + \
                (f" (got {b.shape} {b.dtype})" if isinstance(b, mx.array) else "")
        else:
            biases.append(b)
    # x as given and, with heads_first, q/k/v made in attention's layout: the kernels read K
    # from the weights and write flat rows, so a model's step needs no reshape nodes around it
    lead = x.shape[:-1]
    outs = [(1, n // d, 1, d) for n in (nq, nk, nk)] if heads_first else [(*lead, nq), (*lead, nk), (*lead, nk)]
    return Call([x, norm_w, eps_array(eps), wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, off, *biases],
                {"NQ": nq, "NK": nk, "K": k, "G": group_size, "D": d, "B": int(given)}, dtype_name(x.dtype),
                outs, finish=lambda outs: (outs[0], outs[1], outs[2]))


def one_token_rope(freqs, offset, head_dim: int):
    """The (1,) int32 offset a fused kernel reads for one token's RoPE (a view into device
    memory for an int; an integer array's value stays data, never read here), or why the
    kernels cannot take `freqs` and `offset` (bind's message)."""
    d = head_dim
    if not isinstance(freqs, mx.array) or freqs.shape != (d // 2,) or freqs.dtype != mx.float32:
        return f"freqs must be ({d // 2},) float32 (head_dim / 2)"
    return offset_as_data(offset)


def _rows(s):
    return s["NQ"] + 2 * s["NK"]


def _bytes(s, size):
    n, k, g = _rows(s), s["K"], s["G"]
    # packed weights, scales and biases; x and norm_w; q, k, v (and, at B=1, the projections'
    # biases: at B=0 they are never read); freqs
    return n * k // 2 + 2 * n * k // g * size + 2 * k * size + (1 + s["B"]) * n * size + s["D"] // 2 * 4


OP = OpSpec(
    name="norm_qkv_rope",
    dims=("NQ", "NK", "K", "G", "D", "B"),
    flags=("B",),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(1, s["NQ"]), (1, s["NK"]), (1, s["NK"])],
    output_dtypes=lambda dtype: [dtype, dtype, dtype],
    # half: h, q, k, v each rounded as the reference rounds them (an element one ulp off
    # where a float32 sum straddles a rounding boundary), then the rotation's rounding;
    # float32: a gemv's summation order (qgemv's 2e-5) and the angle: offsets up to 4096
    # radians carry float32 rounding of ~4096 * 6e-8, and MLX's own back ends compute sin and
    # cos differently (rope's 1e-4 at T=4096)
    tolerance={**ROUNDED_ONCE, "float32": 1e-4},
    bytes=_bytes,
    flops=lambda s: 2 * _rows(s) * s["K"] + 4 * s["K"] + 6 * (s["NQ"] + s["NK"]),
    # Llama-3-8B (G=64 and 128), Llama-3.2-1B, Qwen1.5-MoE-A2.7B, Qwen2-7B
    shapes=[{"NQ": 4096, "NK": 1024, "K": 4096, "G": 64, "D": 128, "B": 0},
            {"NQ": 4096, "NK": 1024, "K": 4096, "G": 128, "D": 128, "B": 0},
            {"NQ": 2048, "NK": 512, "K": 2048, "G": 64, "D": 64, "B": 0},
            {"NQ": 2048, "NK": 2048, "K": 2048, "G": 64, "D": 128, "B": 1},
            {"NQ": 3584, "NK": 512, "K": 3584, "G": 64, "D": 128, "B": 1}],
    # GQA 2:1 at D=32; one q head per k head at D=128
    emulator_shapes=[{"NQ": 64, "NK": 32, "K": 512, "G": 64, "D": 32, "B": 0},
                     {"NQ": 128, "NK": 128, "K": 256, "G": 128, "D": 128, "B": 1}],
    # D=2 (one pair a head), 3 q heads on 1 k head, a K of ragged split-K steps (320),
    # D=96 (D/2 not a power of two), and K=2560 with odd head counts: a K the CUDA template's
    # x staging (XS=4096) and split-K (KS=2, a ragged last step) serve
    edge_shapes=[{"NQ": 6, "NK": 2, "K": 64, "G": 64, "D": 2, "B": 1},
                 {"NQ": 40, "NK": 8, "K": 320, "G": 64, "D": 8, "B": 0},
                 {"NQ": 96, "NK": 96, "K": 128, "G": 128, "D": 96, "B": 1},
                 {"NQ": 48, "NK": 16, "K": 2560, "G": 64, "D": 16, "B": 1}],
    bind=bind,
    function=norm_qkv_rope,
    dynamic={"offset": dynamic_offset},
    export_dims={"NQ": "wq.shape[0]", "NK": "wk.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // sq.shape[1]",
                 "D": "2 * freqs.shape[0]", "B": "1"},  # adds what it is given (zeros: no change)
    export_inputs=["(1, K)", "(K,)", "(1,)",
                   "(NQ, K // 8)", "(NQ, K // G)", "(NQ, K // G)",
                   "(NK, K // 8)", "(NK, K // G)", "(NK, K // G)",
                   "(NK, K // 8)", "(NK, K // G)", "(NK, K // G)",
                   "(D // 2,)", "(1,)", "(NQ,)", "(NK,)", "(NK,)"],
    export_outputs=["(1, NQ)", "(1, NK)", "(1, NK)"],
)
