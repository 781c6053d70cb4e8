"""qmm: y = x @ dequantize(w).T for M rows x (M, K) and a 4-bit affine quantized weight in
MLX's format (as qgemv's; `mx.quantize(w, group_size=G, bits=4)`), the matmul of a prefill.
Built-in: mx.quantized_matmul(..., transpose=True).

A kernel of this op writes the dequantized weight (N, K) in x's dtype; MLX's matmul then
multiplies (`then`). Where the built-in's quantized matmul runs its tensor cores well below
what MLX's dense matmul reaches, paying one write and one read of the fp16 weight can win:
the sweep measures whether it does, at each M, against the built-in, the whole op timed."""

import mlx.core as mx

from .qgemv import _builtin, _inputs as _one_row_inputs, _magnitude, _reference, quantized_reason
from .spec import ROUNDED_ONCE, Call, OpSpec, dtype_name, random_array

# N * K / 8 packed words are indexed in 32 bits by the kernels
MAX_WORDS = 2**31


def _inputs(shape, dtype, rng):
    x, wq, scales, biases = _one_row_inputs({k: shape[k] for k in ("N", "K", "G")}, dtype, rng)
    return [random_array(rng, (shape["M"], shape["K"]), dtype), wq, scales, biases]


def _then(inputs, outs):
    return [inputs[0] @ outs[0].T]


def bind(x, w, scales, biases=None, transpose=True, group_size=64, bits=4, **kwargs):
    why = quantized_reason(x, w, scales, biases, transpose, group_size, bits, kwargs)
    if why:
        return why
    k, n = x.shape[-1], w.shape[0]
    m = x.size // k
    if m < 2:
        return "one row (qgemv's)"
    if n * k // 8 >= MAX_WORDS:
        return f"a weight of {n}x{k} is past the kernels' 32-bit indexing"
    # x as the caller shaped it: the kernel never reads it, and MLX's matmul gives the
    # caller's output shape itself (no reshape nodes before or after)
    return Call([x, w, scales, biases], {"M": m, "N": n, "K": k, "G": group_size}, dtype_name(x.dtype))


OP = OpSpec(
    name="qmm",
    dims=("M", "N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(s["M"], s["N"])],
    kernel_output_shapes=lambda s: [(s["N"], s["K"])],
    then=_then,
    export_then="[x @ outs[0].T]",
    # the fp16 weight is rounded once (as the built-in's tensor cores take it) before the
    # product is summed in fp32 and rounded again
    tolerance={**ROUNDED_ONCE, "float32": 2e-5},
    bytes=lambda s, size: s["N"] * s["K"] // 2 + (2 * s["N"] * s["K"] // s["G"] + s["M"] * (s["K"] + s["N"])) * size,
    flops=lambda s: 2 * s["M"] * s["N"] * s["K"],
    bound="compute",
    # Llama-3-8B's projections at a 512-token prompt (mlx-lm's prefill runs the prompt but
    # its last token: 511 rows)
    shapes=[{"M": 511, "N": 4096, "K": 4096, "G": 64}, {"M": 511, "N": 1024, "K": 4096, "G": 64},
            {"M": 511, "N": 14336, "K": 4096, "G": 64}, {"M": 511, "N": 4096, "K": 14336, "G": 64}],
    emulator_shapes=[{"M": 8, "N": 64, "K": 512, "G": 64}, {"M": 3, "N": 32, "K": 256, "G": 128}],
    edge_shapes=[{"M": 2, "N": 1, "K": 128, "G": 128}, {"M": 5, "N": 37, "K": 320, "G": 64}],
    bind=bind,
    function=mx.quantized_matmul,
    export_dims={"M": "x.shape[0]", "N": "w.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // scales.shape[1]"},
    export_inputs=["(M, K)", "(N, K // 8)", "(N, K // G)", "(N, K // G)"],
    export_outputs=["(N, K)"],
)
