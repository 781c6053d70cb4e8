"""softmax over the last axis of a (rows, cols) array; built-in mx.softmax."""

import mlx.core as mx

from .spec import Call, as_shape, dtype_name, random_array, rowwise

def bind(x, axis=None, **kwargs):
    """mx.softmax's arguments (axis=None: over every element, as MLX)."""
    if kwargs.get("precise"):
        return "precise=True is not tuned"
    if axis is None and x.ndim != 1:
        return "softmax over all axes is not tuned (give axis=-1)"
    if axis is not None and axis not in (-1, x.ndim - 1):
        return "only the last axis is tuned"
    c = x.shape[-1]
    return Call([as_shape(x, (x.size // c, c))], {"R": x.size // c, "C": c}, dtype_name(x.dtype), [x.shape])


OP = rowwise(
    "softmax",
    "x",
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype, 3.0)],
    reference=lambda x: [mx.softmax(x.astype(mx.float32), axis=-1).astype(x.dtype)],
    builtin=lambda x: [mx.softmax(x, axis=-1)],
    bytes=lambda s, size: 2 * s["R"] * s["C"] * size,
    flops=lambda s: 5 * s["R"] * s["C"],
    shapes=[{"R": 8192, "C": 4096}, {"R": 32, "C": 32000}],
    bind=bind,
    function=mx.softmax,
)
