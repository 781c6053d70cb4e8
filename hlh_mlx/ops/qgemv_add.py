"""qgemv_add: a decoder block's o_proj or down_proj at decode with the residual add fused in
its epilogue: y = r + x @ dequantize(w).T, for one token x (1, K), a 4-bit affine quantized
weight in MLX's format (as in qgemv: w_q (N, K/8) uint32, scales and biases (N, K/G) in x's
dtype, G in (64, 128)) and a residual r (1, N) in x's dtype; y (1, N) in x's dtype.
Built-in: what mlx-lm runs today, r + mx.quantized_matmul(...), two launches where a kernel
needs one (and the sum written, then read again, by the add).

Rounding: mlx-lm gets the gemv rounded to the dtype (the matmul's output), then the add in
the dtype. The reference (and every kernel) rounds the float32 dot to the dtype first, then
adds r in float32 and rounds once: the sum of two dtype values rounded once is what the
dtype's own add gives, so the add is bit-equal to the built-in's and only the dot's
summation order differs."""

import math

import mlx.core as mx

from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array, affine_4bit_reason



def _inputs(shape, dtype, rng):
    n, k, g = shape["N"], shape["K"], shape["G"]
    w = random_array(rng, (n, k), dtype, 1.0 / math.sqrt(k))
    wq, scales, biases = mx.quantize(w, group_size=g, bits=4)
    # the residual the size of the gemv (both ~N(0, 1)): a kernel that drops either term fails
    return [random_array(rng, (1, k), dtype), wq, scales, biases, random_array(rng, (1, n), dtype)]


def _group(wq, scales):
    return wq.shape[1] * 8 // scales.shape[1]


def _dequant32(wq, scales, biases):
    return mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=_group(wq, scales),
                         bits=4)


def _reference(x, wq, scales, biases, r):
    # the gemv rounded to the dtype as the model's matmul gives it; + r in float32, rounded once
    g = (x.astype(mx.float32) @ _dequant32(wq, scales, biases).T).astype(x.dtype)
    return [(g.astype(mx.float32) + r.astype(mx.float32)).astype(x.dtype)]


def _magnitude(x, wq, scales, biases, r):
    """The size rounding error scales with: the gemv's root sum of squares of its products (as
    qgemv's magnitude) and the residual's own size, so a y where r and the dot cancel to ~0 is
    not failed for the dot's summation order."""
    w = _dequant32(wq, scales, biases)
    x32 = x.astype(mx.float32)
    return [mx.sqrt((x32 * x32) @ (w * w).T + mx.square(r.astype(mx.float32)))]


def qgemv_add(x, w, scales, biases, r, group_size=64, bits=4):
    """r + x @ W.T with a 4-bit affine quantized W: a decoder block's o_proj or down_proj and its
    residual add at decode, as mlx-lm computes them (mx.quantized_matmul, then + r).

    One token x may also come in another layout of its K values, attention's heads
    (1, heads, 1, head_dim) for o_proj: it is read as the row r's leading dims and K (the
    tuned kernels read it as it is; the built-in composition reshapes it)."""
    if _token_as_row(x, w, r, bits):
        x = x.reshape(*r.shape[:-1], x.size)
    return r + mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def _token_as_row(x, w, r, bits=4) -> bool:
    """x is one token's K values in another layout than (..., K) (attention's heads), to be
    read as a row of the residual's leading dims: w is (N, K * bits / 32) and r is (..., N)
    with N values. Anything else is left to MLX (whose own error then names the problem)."""
    if not (isinstance(w, mx.array) and w.ndim == 2 and isinstance(r, mx.array) and isinstance(x, mx.array)):
        return False
    n, k = w.shape[0], w.shape[1] * 32 // bits
    return x.ndim > 0 and x.shape[-1] != k and x.size == k and r.ndim > 0 and r.shape[-1] == n and r.size == n


def _builtin(x, wq, scales, biases, r):
    return [qgemv_add(x, wq, scales, biases, r, group_size=_group(wq, scales), bits=4)]


def bind(x, w, scales, biases, r, group_size=64, bits=4):
    why = affine_4bit_reason(x, [(w, scales, biases)], group_size, bits)
    if why:
        return why
    if w.ndim != 2:
        return f"w must be (N, K/8) uint32 (got {w.ndim} dims)"
    n, k = w.shape[0], w.shape[1] * 8
    if not isinstance(r, mx.array):
        return f"the residual must be an mx.array (got {type(r).__name__})"
    # one token: x (..., K), or its K values in another layout (attention's heads), then
    # read as a row of r's shape
    as_row = _token_as_row(x, w, r, bits)
    if x.shape[-1] != k and not as_row:
        if x.size == k:
            return f"x holds one token's {k} values in the shape {x.shape}, read as a row of the residual's " \
                   f"shape, which must then be (1, ..., {n}) (got {r.shape})"
        return f"x's last dimension {x.shape[-1]} is not w's K = {k} (w is ({n}, {k // 8}) uint32), " \
               f"nor is x one token of {k} values ({x.size} given)"
    if x.size != k:
        return f"one token only ({x.size // k} rows given)"
    if k % group_size:
        return f"x's last dimension {k} is not a multiple of the group size {group_size}"
    if scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        return f"scales and biases must be ({n}, {k // group_size}): x's last dimension over the group size"
    out = r.shape if as_row else (*x.shape[:-1], n)
    if r.shape != out:
        return f"the residual must have shape {out}, x's leading dims and N (got {r.shape}: no broadcasting)"
    if r.dtype != x.dtype:
        return f"the residual must be in x's dtype {x.dtype} (got {r.dtype}: no promotion)"
    # x and r as given (one token under any leading 1-dims, or attention's heads: the kernels
    # read K and N from the weights), so a model's activations need no view nodes around the call
    return Call([x, w, scales, biases, r], {"N": n, "K": k, "G": group_size},
                dtype_name(x.dtype), [out])


def _bytes(s, size):
    n, k, g = s["N"], s["K"], s["G"]
    # packed weights, scales and biases, x; r read and y written
    return n * k // 2 + (2 * n * k // g + k + 2 * n) * size


OP = OpSpec(
    name="qgemv_add",
    dims=("N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(1, s["N"])],
    # half: the dot rounded to T as the reference rounds it (one ulp off where the float32
    # sums straddle a rounding boundary), then the add rounded once; float32: qgemv's
    # summation order (2e-5)
    tolerance={**ROUNDED_ONCE, "float32": 2e-5},
    bytes=_bytes,
    flops=lambda s: 2 * s["N"] * s["K"] + s["N"],
    # Llama-3-8B o_proj and down_proj (G=64 and 128), Qwen3-8B down_proj
    shapes=[{"N": 4096, "K": 4096, "G": 64}, {"N": 4096, "K": 14336, "G": 64}, {"N": 4096, "K": 4096, "G": 128},
            {"N": 4096, "K": 14336, "G": 128}, {"N": 4096, "K": 12288, "G": 64}],
    emulator_shapes=[{"N": 64, "K": 512, "G": 64}, {"N": 64, "K": 512, "G": 128}],
    # odd N everywhere; the last two: a ragged last step at K the CUDA template's split-K
    # variants serve (KS=2 at K=2560; KS=4 and 8 at K=9216) and its x staging (XS=4096,
    # XS=16384), so a GPU check covers those paths off the timed shapes
    edge_shapes=[{"N": 1, "K": 128, "G": 128}, {"N": 37, "K": 320, "G": 64}, {"N": 5, "K": 384, "G": 128},
                 {"N": 3, "K": 64, "G": 64}, {"N": 37, "K": 2560, "G": 64}, {"N": 7, "K": 9216, "G": 128}],
    bind=bind,
    function=qgemv_add,
    export_dims={"N": "w.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // scales.shape[1]"},
    export_inputs=["(1, K)", "(N, K // 8)", "(N, K // G)", "(N, K // G)", "(1, N)"],
    export_outputs=["(1, N)"],
)
