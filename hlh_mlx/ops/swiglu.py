"""swiglu: y = silu(g) * u, elementwise over (rows, cols); built-in: nn.silu(g) * u as users write it."""

import mlx.core as mx
import mlx.nn as nn

from .spec import Call, as_shape, dtype_name, random_array, rowwise


def _reference(g, u):
    g32 = g.astype(mx.float32)
    return [(g32 * mx.sigmoid(g32) * u.astype(mx.float32)).astype(g.dtype)]


def bind(g, u, **_):
    if g.shape != u.shape or g.dtype != u.dtype:
        return "g and u must have the same shape and dtype"
    c = g.shape[-1]
    rc = (g.size // c, c)
    return Call([as_shape(g, rc), as_shape(u, rc)], {"R": g.size // c, "C": c}, dtype_name(g.dtype), [g.shape])



def _silu_mul(g, u):
    import mlx.nn as nn
    return nn.silu(g) * u


OP = rowwise(
    "swiglu",
    "g",
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype, 2.0),
                                       random_array(rng, (s["R"], s["C"]), dtype)],
    reference=_reference,
    builtin=lambda g, u: [nn.silu(g) * u],
    bytes=lambda s, size: 3 * s["R"] * s["C"] * size,
    flops=lambda s: 6 * s["R"] * s["C"],
    shapes=[{"R": 8192, "C": 14336}, {"R": 1, "C": 14336}],
    emulator_shapes=[{"R": 4, "C": 1000}],
    bind=bind,
    function=_silu_mul,
)
