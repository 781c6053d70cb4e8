"""Tuned kernels as drop-in functions: `hlh_mlx.tuned.softmax(x)` and friends
(softmax, rms_norm, layer_norm, swiglu, gelu, matmul, gemv, quantized_matmul, rope,
scaled_dot_product_attention; the fused decoder ops qgemv_swiglu, qgemv_add,
norm_qgemv_swiglu, norm_qkv_rope, qk_norm_rope and add_rms_norm, and the MoE ops moe_route,
moe_qgemv_swiglu and moe_qgemv_combine, with the built-in compositions they replace), with
the arguments of the MLX function each replaces.

Each call runs the best stored variant for this device, back end, dtype and shape (the
exact shape if it was tuned, else the nearest tuned shape its variant supports), but only
where that variant beat the built-in *end to end* where it was measured: latency in a
dependent chain plus the host time of a call (`hlh_mlx.select`). Otherwise the MLX
built-in runs, and that is recorded: `explain(op, *args)` says what would run and why,
`fallbacks()` counts what did (once per distinct call), and HLH_MLX_STRICT=1 turns a
fallback into an error.

A call is decided once per signature (shapes, dtypes, other arguments) and then costs a
lookup and the kernel launch (`hlh_mlx.runtime`). An op no stored variant serves at any
shape on this device runs the built-in directly after its first call (counted once, not
per distinct call); inside `recording()` (and `lenient()`) every distinct call is decided
and counted. Functions that call these work under
`mx.compile` and `mx.grad`: a tuned kernel carries the built-in's gradient (VJP);
`tuned.<op>.no_grad` is the same op without it, one graph node fewer, for inference (what
`hlh_mlx.nn` layers in eval mode and patched blocks run), where a gradient raises. Forward
derivatives (`mx.jvp`) through a kernel raise, as MLX's do for any custom kernel.

Every op spec with a `function` and a `bind` is callable: `tuned.<op>(...)` or
`tuned.call("<op>", ...)`, with the arguments of that MLX function.
"""

from __future__ import annotations

from . import ops, runtime
from .runtime import Dispatch, FallbackError, explain, fallbacks, lenient, recording  # noqa: F401  (public API)
from .select import MAX_EXTRAPOLATION, variant_of  # noqa: F401  (public API)


def refresh() -> None:
    """Forget decided calls, stored results, kernels, settings and fallback counts (after
    a sweep in this process, or after changing an HLH_MLX_* setting)."""
    runtime.refresh()


_dispatches: dict = {}


def dispatch(op_name: str):
    """The tuned entry point of any op, from its spec (`function`, `bind`): an op an agent
    adds is callable the same day, no wrapper needed.
    A function (`Dispatch.function`), with the op's `plans`, `plan_for` and `no_grad`."""
    if op_name not in _dispatches:
        spec = ops.get(op_name)
        if spec.function is None or spec.bind is None:
            raise ValueError(f"[hlh_mlx.tuned] op {op_name!r} has no `function` and `bind` in its spec "
                             f"(hlh_mlx/ops/{op_name}.py): nothing to call or to fall back to")
        doc = (spec.function.__doc__ or "").strip().splitlines()
        _dispatches[op_name] = Dispatch(op_name, spec.function, differentiable=True,
                                        dynamic=tuple(spec.dynamic),
                                        doc=f"{op_name}: tuned, with the arguments of "
                                            f"{getattr(spec.function, '__name__', spec.function)}. "
                                            + (doc[0] if doc else "")).function
    return _dispatches[op_name]


def call(op_name: str, *args, **kwargs):
    """`tuned.call("rms_norm", x, w, 1e-5)`: any op by name, with its MLX function's arguments."""
    return dispatch(op_name)(*args, **kwargs)


def __getattr__(name: str):
    """`tuned.<op>` for every op spec (ops added after this module was written too)."""
    if name in ops.names():
        return dispatch(name)
    raise AttributeError(f"module 'hlh_mlx.tuned' has no attribute {name!r} (ops: {', '.join(ops.names())})")


softmax = dispatch("softmax")
rms_norm = dispatch("rms_norm")
layer_norm = dispatch("layer_norm")
swiglu = dispatch("swiglu")
rope = dispatch("rope")  # the offset travels as data: one plan serves every decode step
gemv = dispatch("gemv")
quantized_matmul = qgemv = dispatch("qgemv")
qgemv_swiglu = dispatch("qgemv_swiglu")  # (x, wg, sg, bg, wu, su, bu, group_size, bits): silu(x Wg^T) * (x Wu^T)
scaled_dot_product_attention = decode_attention = dispatch("decode_attention")
gelu = dispatch("gelu")
matmul = dispatch("matmul")
