"""decode_attention: one query token against a KV cache, o = softmax(q k^T * scale) v per
query head, with grouped-query heads (query head h reads KV head h // (HQ / HKV));
q (HQ, D), k and v (HKV, L, D), scale (1,) float32; built-in
mx.fast.scaled_dot_product_attention on (1, HQ, 1, D) / (1, HKV, L, D)."""

import math

import mlx.core as mx

from .spec import Call, as_shape, OpSpec, constant, dtype_name, input_constant, is_number, random_array


def _inputs(s, dtype, rng):
    return [random_array(rng, (s["HQ"], s["D"]), dtype), random_array(rng, (s["HKV"], s["L"], s["D"]), dtype),
            random_array(rng, (s["HKV"], s["L"], s["D"]), dtype), input_constant([1.0 / math.sqrt(s["D"])], mx.float32)]


def _reference(q, k, v, scale):
    hq, hkv = q.shape[0], k.shape[0]
    kf = mx.repeat(k.astype(mx.float32), hq // hkv, axis=0)
    vf = mx.repeat(v.astype(mx.float32), hq // hkv, axis=0)
    s = (kf @ q.astype(mx.float32)[:, :, None])[..., 0] * scale   # (HQ, L)
    return [(mx.softmax(s, axis=-1)[:, None, :] @ vf)[:, 0, :].astype(q.dtype)]


def _builtin_for(s):
    hq, hkv, d, sc = s["HQ"], s["HKV"], s["D"], 1.0 / math.sqrt(s["D"])
    return lambda q, k, v, *_: [mx.fast.scaled_dot_product_attention(
        q.reshape(1, hq, 1, d), k.reshape(1, hkv, -1, d), v.reshape(1, hkv, -1, d), scale=sc).reshape(hq, d)]


def _builtin(q, k, v, scale):
    o = mx.fast.scaled_dot_product_attention(q[None, :, None, :], k[None], v[None], scale=scale.item())
    return [o.reshape(q.shape)]


def bind(q, k, v, *, scale, mask=None, **kwargs):
    if mask is not None or kwargs.get("sinks") is not None:
        return "tuned decode attention takes no mask or sinks"
    if not is_number(scale):
        return "scale as a finite number (the kernel takes it as a constant; the built-in also takes an array)"
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != 1 or q.shape[2] != 1:
        return "one query token of batch 1: q (1, HQ, 1, D), k and v (1, HKV, L, D)"
    _, hq, _, d = q.shape
    _, hkv, l, _ = k.shape
    if v.shape != k.shape or k.shape[3] != d or hq % hkv or not (q.dtype == k.dtype == v.dtype):
        return "k and v (1, HKV, L, D) of q's dtype with HKV dividing HQ"
    # views by reshape, not k[0]: measured on the H200 a chain of calls through k[0] and v[0]
    # ran 3x slower than the kernel alone (benchmarks/user_path_probe.py)
    return Call([as_shape(q, (hq, d)), as_shape(k, (hkv, l, d)), as_shape(v, (hkv, l, d)), constant([scale], mx.float32)],
                {"HQ": hq, "HKV": hkv, "L": l, "D": d}, dtype_name(q.dtype), [q.shape])


OP = OpSpec(
    name="decode_attention",
    dims=("HQ", "HKV", "L", "D"),
    make_inputs=_inputs,
    reference=_reference,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(s["HQ"], s["D"])],
    # float32 accumulation over L keys, exp of differences: order effects only
    tolerance={"float32": 2e-5, "float16": 3e-3, "bfloat16": 1.5e-2},
    bytes=lambda s, size: (2 * s["HKV"] * s["L"] * s["D"] + 2 * s["HQ"] * s["D"]) * size,
    flops=lambda s: 4 * s["HQ"] * s["L"] * s["D"],
    shapes=[{"HQ": 32, "HKV": 8, "L": 4096, "D": 128}, {"HQ": 32, "HKV": 32, "L": 4096, "D": 128},
            {"HQ": 32, "HKV": 8, "L": 1024, "D": 64}],
    emulator_shapes=[{"HQ": 8, "HKV": 2, "L": 100, "D": 64}, {"HQ": 4, "HKV": 4, "L": 37, "D": 128}],
    edge_shapes=[{"HQ": 1, "HKV": 1, "L": 1, "D": 64}, {"HQ": 8, "HKV": 1, "L": 129, "D": 128},
                 {"HQ": 4, "HKV": 4, "L": 3, "D": 64}],
    bind=bind,
    function=mx.fast.scaled_dot_product_attention,
    export_dims={"HQ": "q.shape[0]", "HKV": "k.shape[0]", "L": "k.shape[1]", "D": "q.shape[1]"},
    export_inputs=["(HQ, D)", "(HKV, L, D)", "(HKV, L, D)", "(1,)"],
    export_outputs=["(HQ, D)"],
)
