"""gelu: y = x * (1 + erf(x / sqrt(2))) / 2, elementwise; reference mlx.nn.gelu.

Written by following .codex/skills/author-template (the op spec, then one template).
"""

import mlx.core as mx
import mlx.nn as nn

from .spec import ROUNDED_ONCE, Call, as_shape, OpSpec, dtype_name, random_array

def bind(x, **_):
    return Call([as_shape(x, (x.size,))], {"N": x.size}, dtype_name(x.dtype), [x.shape])



def _nn_gelu(x):
    import mlx.nn as nn
    return nn.gelu(x)


OP = OpSpec(
    name="gelu",
    dims=("N",),
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["N"],), dtype, 2.0)],
    # the reference runs in float32 on the same (rounded) inputs, then rounds once
    reference=lambda x: [nn.gelu(x.astype(mx.float32)).astype(x.dtype)],
    builtin=lambda x: [nn.gelu(x)],
    output_shapes=lambda s: [(s["N"],)],
    tolerance=ROUNDED_ONCE,
    bytes=lambda s, size: 2 * s["N"] * size,
    flops=lambda s: 20 * s["N"],
    shapes=[{"N": 1 << 24}, {"N": 4096 * 14336}],
    emulator_shapes=[{"N": 4096}],
    bind=bind,
    function=_nn_gelu,
    export_dims={"N": "x.shape[0]"},
    export_outputs=["(N,)"],
    edge_shapes=[{"N": 1}, {"N": 1029}],
)
