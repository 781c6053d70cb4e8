"""Tuned kernels as drop-in functions: `hlh_mlx.tuned.softmax(x)` and friends
(softmax, rms_norm, layer_norm, swiglu, gelu, matmul, gemv, quantized_matmul (one token
through qgemv, several rows through qmm: `OpSpec.also`), rope,
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

import mlx.core as mx

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
                                        dynamic=dict(spec.dynamic),
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


# Entries with the built-in's own signature, for ops called with several keywords: CPython
# binds a keyword to a named parameter directly, where the generic entry (`**kwargs`)
# collects a dictionary and numbers its keys on every call; here the keywords' number is
# fixed once and their values go to the op's compiled function (or, for an op no variant
# serves anywhere, to the built-in) as they are. Anything else (a keyword left out, an
# unknown one, a stream, a positional past the signature) takes the generic entry, which
# answers it as it always did (the built-in's own error included).
_UNSET = object()


def _rope_entry(generic, no_grad=None):
    d, array = generic.dispatch, mx.array
    names = ("traditional", "base", "scale", "offset")
    kid, kid_freqs = d.keywords(names)[0], d.keywords((*names, "freqs"))[0]  # Llama 3's RoPE passes freqs
    convert = ops.get("rope").dynamic["offset"]  # the offset travels as data: one plan serves every step

    def rope(a, dims, *args, traditional=_UNSET, base=_UNSET, scale=_UNSET, offset=_UNSET, freqs=None, **rest):
        if args or rest or traditional is _UNSET or base is _UNSET or scale is _UNSET or offset is _UNSET:
            given = {k: v for k, v in (("traditional", traditional), ("base", base), ("scale", scale),
                                       ("offset", offset)) if v is not _UNSET}
            if freqs is not None:
                given["freqs"] = freqs
            return generic(a, dims, *args, **given, **rest)
        direct = d._direct  # an op no stored variant serves anywhere: the built-in, nothing else
        if direct is not None:
            return direct(a, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)
        traced = d._traced
        if traced is not None:
            off = offset if type(offset) is array else convert(offset)  # None: not a value a kernel takes
            if off is not None:
                try:
                    if freqs is None:
                        return traced(kid, a, dims, traditional, base, scale, off)
                    return traced(kid_freqs, a, dims, traditional, base, scale, off, freqs)
                except Exception:
                    pass  # what MLX cannot trace: the generic entry decides it
        if freqs is None:
            return generic(a, dims, traditional=traditional, base=base, scale=scale, offset=offset)
        return generic(a, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)
    return runtime.entry_function(rope, d, no_grad)


def _quantized_matmul_entry(generic, no_grad=None):
    d = generic.dispatch
    names = ("transpose", "group_size", "bits")
    kid, kid_mode = d.keywords(names)[0], d.keywords((*names, "mode"))[0]  # hlh_mlx.nn passes mode

    def quantized_matmul(x, w, /, scales, biases=None, transpose=_UNSET, group_size=_UNSET, bits=_UNSET,
                         *args, mode=_UNSET, **rest):
        if args:  # more positionals (mode): transpose, group_size and bits came positionally too
            return generic(x, w, scales, biases, transpose, group_size, bits, *args,
                           **({} if mode is _UNSET else {"mode": mode}), **rest)
        if rest or transpose is _UNSET or group_size is _UNSET or bits is _UNSET:
            given = {k: v for k, v in (("transpose", transpose), ("group_size", group_size), ("bits", bits),
                                       ("mode", mode)) if v is not _UNSET}
            return generic(x, w, scales, biases, **given, **rest)
        direct = d._direct
        if direct is not None:
            if mode is _UNSET:
                return direct(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits)
            return direct(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode)
        traced = d._traced
        if traced is not None:
            try:
                if mode is _UNSET:
                    return traced(kid, x, w, scales, biases, transpose, group_size, bits)
                return traced(kid_mode, x, w, scales, biases, transpose, group_size, bits, mode)
            except Exception:
                pass
        if mode is _UNSET:
            return generic(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits)
        return generic(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode)
    return runtime.entry_function(quantized_matmul, d, no_grad)


def _with_entry(op_name: str, make):
    """The op's entry (and its no_grad twin's) made by `make`, registered as `dispatch(op_name)`."""
    generic = dispatch(op_name)
    fast = make(generic, make(generic.no_grad))
    _dispatches[op_name] = fast
    return fast


ENTRIES = {"rope": _rope_entry, "qgemv": _quantized_matmul_entry}  # op -> its fixed-signature entry's maker

softmax = dispatch("softmax")
rms_norm = dispatch("rms_norm")
layer_norm = dispatch("layer_norm")
swiglu = dispatch("swiglu")
rope = _with_entry("rope", ENTRIES["rope"])
gemv = dispatch("gemv")
quantized_matmul = qgemv = _with_entry("qgemv", ENTRIES["qgemv"])
qgemv_swiglu = dispatch("qgemv_swiglu")  # (x, wg, sg, bg, wu, su, bu, group_size, bits): silu(x Wg^T) * (x Wu^T)
scaled_dot_product_attention = decode_attention = dispatch("decode_attention")
gelu = dispatch("gelu")
matmul = dispatch("matmul")
