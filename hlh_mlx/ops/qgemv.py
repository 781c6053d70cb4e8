"""qgemv: y = x @ dequantize(w).T for one token x (1, K) and a 4-bit affine quantized
weight in MLX's own format (`mx.quantize(w, group_size=G, bits=4)`: w_q (N, K/8) uint32
with element 8c+j in bits 4j..4j+3 of word c, scales and biases (N, K/G) in x's dtype,
value = scale * q + bias); built-in: mx.quantized_matmul(..., transpose=True)."""

import math

import mlx.core as mx

from .spec import ROUNDED_ONCE, Call, as_shape, OpSpec, dtype_name, random_array, QUANT_GROUPS



def _inputs(shape, dtype, rng):
    w = random_array(rng, (shape["N"], shape["K"]), dtype, 1.0 / math.sqrt(shape["K"]))
    wq, scales, biases = mx.quantize(w, group_size=shape["G"], bits=4)
    return [random_array(rng, (1, shape["K"]), dtype), wq, scales, biases]


def _reference(x, wq, scales, biases):
    g = wq.shape[1] * 8 // scales.shape[1]
    w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=g, bits=4)
    return [(x.astype(mx.float32) @ w.T).astype(x.dtype)]


def _magnitude(x, wq, scales, biases):
    g = wq.shape[1] * 8 // scales.shape[1]
    w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=g, bits=4)
    x = x.astype(mx.float32)
    return [mx.sqrt((x * x) @ (w * w).T)]


def _builtin(x, wq, scales, biases):
    g = wq.shape[1] * 8 // scales.shape[1]
    return [mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=g, bits=4)]


def quantized_reason(x, w, scales, biases, transpose, group_size, bits, kwargs) -> str | None:
    """Why no 4-bit kernel takes these quantized_matmul arguments, or None (qgemv's and qmm's)."""
    if not transpose or bits != 4 or group_size not in QUANT_GROUPS or kwargs.get("mode", "affine") != "affine":
        return f"tuned kernels take transpose=True, bits=4, affine mode, group_size in {QUANT_GROUPS}"
    if biases is None or x.dtype != scales.dtype or x.dtype != biases.dtype or w.dtype != mx.uint32:
        return "x, scales and biases must share one dtype; w must be uint32"
    k, n = x.shape[-1], w.shape[0]
    if w.shape != (n, k // 8) or scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        return "w, scales and biases do not match x's last dimension and the group size"
    return None


def bind(x, w, scales, biases=None, transpose=True, group_size=64, bits=4, **kwargs):
    why = quantized_reason(x, w, scales, biases, transpose, group_size, bits, kwargs)
    if why:
        return why
    k, n = x.shape[-1], w.shape[0]
    if x.size != k:
        return f"one token only ({x.size // k} rows given)"
    return Call([as_shape(x, (1, k)), w, scales, biases], {"N": n, "K": k, "G": group_size}, dtype_name(x.dtype),
                [(*x.shape[:-1], n)])


OP = OpSpec(
    name="qgemv",
    dims=("N", "K", "G"),
    make_inputs=_inputs,
    reference=_reference,
    magnitude=_magnitude,
    builtin=_builtin,
    output_shapes=lambda s: [(1, s["N"])],
    tolerance={**ROUNDED_ONCE, "float32": 2e-5},
    bytes=lambda s, size: s["N"] * s["K"] // 2 + (2 * s["N"] * s["K"] // s["G"] + s["K"] + s["N"]) * size,
    flops=lambda s: 2 * s["N"] * s["K"],
    shapes=[{"N": 14336, "K": 4096, "G": 64}, {"N": 4096, "K": 14336, "G": 64}, {"N": 14336, "K": 4096, "G": 128}],
    emulator_shapes=[{"N": 64, "K": 512, "G": 64}, {"N": 64, "K": 512, "G": 128}],
    edge_shapes=[{"N": 1, "K": 128, "G": 128}, {"N": 37, "K": 320, "G": 64}, {"N": 5, "K": 384, "G": 128}],
    bind=bind,
    function=mx.quantized_matmul,
    also=("qmm",),  # several rows (a prefill)
    takes=lambda x, *args, **kwargs: type(x) is not mx.array or x.ndim == 0 or x.size == x.shape[-1],
    export_dims={"N": "w.shape[0]", "K": "x.shape[1]", "G": "x.shape[1] // scales.shape[1]"},
    export_inputs=["(1, K)", "(N, K // 8)", "(N, K // G)", "(N, K // G)"],
    export_outputs=["(1, N)"],
)
