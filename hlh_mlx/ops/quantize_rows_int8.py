"""quantize_rows_int8: dynamic per-row symmetric int8 quantization of activations, as LLM
inference quantizes them before an int8 matmul. For x (R, C) in float32/float16/bfloat16:

    scale[r] = max(|x[r, :]|) / 127   (float32; 1 where the row is all zeros)
    q[r, c]  = clip(round(x[r, c] / scale[r]), -127, 127)   (round half to even, int8)

Two outputs: q (R, C) int8 and scale (R,) float32. Every step is exact in float32 apart
from the division, which IEEE rounds once, so a kernel that computes the same float32
steps matches q exactly (integer outputs are compared exactly) and scale bit for bit."""

import mlx.core as mx
import numpy as np

from .spec import ROUNDED_ONCE, Call, DTYPES, as_shape, dtype_name, random_array, rowwise


def quantize_rows_int8(x):
    """(q, scale): x quantized per row (last axis) to int8, and each row's float32 scale."""
    x32 = x.astype(mx.float32)
    amax = mx.max(mx.abs(x32), axis=-1)
    scale = mx.where(amax == 0, mx.array(1.0, mx.float32), amax / 127.0)
    q = mx.clip(mx.round(x32 / mx.expand_dims(scale, -1)), -127, 127).astype(mx.int8)
    return q, scale


def _reference(x):
    return list(quantize_rows_int8(x))


def _inputs(s, dtype, rng):
    """Random rows, plus (where there are rows enough) an all-zero row and a row of
    half-integers whose largest |value| is 127, so scale is 1 and every quotient is a tie
    that round-half-to-even decides."""
    x = np.array(random_array(rng, (s["R"], s["C"]), mx.float32), dtype=np.float32)
    if s["R"] >= 2:
        halves = rng.integers(-254, 255, size=s["C"]).astype(np.float32) / 2
        halves[rng.integers(0, s["C"])] = 127.0 * rng.choice([-1.0, 1.0])
        x[1] = halves
    if s["R"] >= 3:
        x[2] = 0.0
    return [mx.array(x).astype(DTYPES[dtype] if isinstance(dtype, str) else dtype)]


def bind(x):
    if not isinstance(x, mx.array) or x.ndim < 1 or x.size == 0:
        return "needs a non-empty mx.array with at least one dimension"
    if x.dtype not in DTYPES.values():
        return f"dtype {x.dtype} is not float32, float16 or bfloat16"
    c = x.shape[-1]
    rows = x.size // c
    return Call([as_shape(x, (rows, c))], {"R": rows, "C": c}, dtype_name(x.dtype),
                [x.shape, x.shape[:-1]], finish=lambda outs: (outs[0], outs[1]))


OP = rowwise(
    "quantize_rows_int8",
    "x",
    make_inputs=_inputs,
    reference=_reference,
    output_shapes=lambda s: [(s["R"], s["C"]), (s["R"],)],
    output_dtypes=lambda dtype: [mx.int8, mx.float32],
    # q is compared exactly (integer); scale is float32 from exact steps and one division
    tolerance=ROUNDED_ONCE,
    # read x, write q (1 byte) and scale (4 bytes a row)
    bytes=lambda s, size: s["R"] * s["C"] * (size + 1) + 4 * s["R"],
    flops=lambda s: 3 * s["R"] * s["C"],
    # decode (one token), prefill (512 tokens) and a large batch at Llama-3-8B widths
    shapes=[{"R": 1, "C": 4096}, {"R": 512, "C": 4096}, {"R": 512, "C": 14336}, {"R": 8192, "C": 4096}],
    emulator_shapes=[{"R": 8, "C": 512}, {"R": 5, "C": 300}],
    # C=1: one element; 1001: odd; 1000: a multiple of 4 and 8 but not of any block
    edge_shapes=[{"R": 1, "C": 1}, {"R": 3, "C": 1001}, {"R": 2, "C": 1000}, {"R": 4, "C": 33}],
    bind=bind,
    function=quantize_rows_int8,
    export_outputs=["(R, C)", "(R,)"],
)
