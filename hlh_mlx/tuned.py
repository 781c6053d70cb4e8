"""Tuned kernels as drop-in functions: `hlh_mlx.tuned.softmax(x)` and friends
(softmax, rms_norm, layer_norm, swiglu, gelu, matmul, gemv, quantized_matmul, rope,
scaled_dot_product_attention), with the arguments of the MLX function each replaces.

Each call picks the best stored variant for this device, backend, dtype and shape: the
exact shape if it was tuned, else the nearest tuned shape whose variant supports this one.
A variant is used only if it was correct and faster than the built-in where it was
measured, and only if its template still renders the same source (a stale result is
ignored with a warning). Otherwise the MLX built-in runs, and that is recorded:
`explain(op, *args)` says what would run and why, `fallbacks()` counts what did, and
HLH_MLX_STRICT=1 turns a fallback into an error (for benchmarks and agents).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from . import backends, hub, ops, rank, store, templates, variants
from .ops.spec import DTYPES
from .variants import Variant

_fallbacks: Counter = Counter()
_lenient = False  # set while hlh_mlx.patch checks layers on made-up inputs
_kernels: dict = {}


class FallbackError(RuntimeError):
    """HLH_MLX_STRICT=1 and no tuned kernel serves this call."""


@dataclass
class Choice:
    variant: Variant | None
    record: dict | None
    reason: str

    def __str__(self) -> str:
        if self.variant is None:
            return f"built-in: {self.reason}"
        t = self.record.get("timing") or {}
        return (f"variant {self.variant.id} ({self.variant.label()}), tuned at {self.record['shape_str']} "
                f"{self.record['dtype']} on {self.record['device']}: {t.get('median_ms', float('nan')):.4f} ms; "
                f"{self.reason}")


@lru_cache(maxsize=None)
def _backend() -> str:
    return backends.auto()


@lru_cache(maxsize=None)
def current_variants(op: str) -> dict[tuple, Variant]:
    """(template relpath, params, source hash) -> the variant, from the templates shipped
    and in $HLH_MLX_TEMPLATES, and from packs the user trusted (hlh_mlx.hub)."""
    out = {}

    def add(t):
        for v in variants.expand(t):
            out.setdefault((t.relpath, tuple(sorted(v.param_dict.items())), v.source_hash), v)

    for t in templates.discover(op):
        add(t)
    for root in hub.trusted_template_roots():
        for p in sorted((root / op).glob("*.j2")):
            try:
                add(templates.load(p))
            except templates.TemplateError as e:  # a broken pack costs its results, not the call
                warnings.warn(f"[hlh_mlx.tuned] skipping a trusted pack's template: {e}", RuntimeWarning, stacklevel=3)
    return out


def variant_of(op: str, record: dict) -> Variant | None:
    """The current variant a stored record was measured with, or None if its template has
    changed since (another source) or the variant left the space."""
    return current_variants(op).get((record.get("template"), tuple(sorted((record.get("params") or {}).items())),
                                     record.get("source_hash")))


@lru_cache(maxsize=None)
def _candidates(op: str, device: str, backend: str) -> tuple:
    """Correct, timed variant records with their built-in's time, stale ones dropped."""
    records = [r for r in store.load(device, op) if hub.is_trusted(r.get("source", "local"))]
    # per (shape, dtype): only the newest timing method, never a second timing
    groups: dict = {}
    for r in records:
        groups.setdefault((r.get("shape_str"), r.get("dtype"), r.get("backend")), []).append(r)
    records = [r for g in groups.values() for r in rank.newest_method(g) if not r.get("repeat")]
    out = []
    builtin: dict = {}  # (shape, dtype) -> the built-in's time in the run being read (it precedes its variants)
    for r in records:
        if r.get("template") == "builtin" and r.get("timing") and r.get("backend") == backend:
            builtin[(r["shape_str"], r["dtype"])] = r["timing"]["median_ms"]
        if r.get("template") == "builtin" or r.get("backend") != backend or not r.get("correct") or not r.get("timing"):
            continue
        v = variant_of(op, r)
        if v is None:
            warnings.warn(f"[hlh_mlx.tuned] ignoring stored {op} variant {r.get('variant_id')}: its template "
                          "changed since it was tuned (re-run the sweep)", RuntimeWarning, stacklevel=3)
            continue
        base = builtin.get((r["shape_str"], r["dtype"]))
        out.append((v, r, base))
    return tuple(out)


def _distance(a: dict, b: dict) -> float:
    return sum(abs(math.log(max(a[k], 1)) - math.log(max(b[k], 1))) for k in a)


_choices: dict = {}
# A variant serves shapes moving at most this many times more or fewer bytes than the shape
# it won at: measured on the H100, kernels that win at LLM prefill sizes lose at decode
# sizes, where launch overhead dominates (~5 us vs MLX's ~3 us per launch).
MAX_EXTRAPOLATION = 8


def choose(op_name: str, call) -> Choice:
    """The variant (or the built-in) for a bound call; memoized per shape and dtype, since
    a decode loop makes the same few calls thousands of times."""
    if isinstance(call, str):
        return Choice(None, None, call)
    key = (op_name, tuple(call.shape.items()), call.dtype)  # bind lists dims in the op's order
    if key not in _choices:
        _choices[key] = _choose(op_name, call)
    return _choices[key]


def _choose(op_name: str, call) -> Choice:
    op = ops.get(op_name)
    be = _backend()
    dev = backends.device(be).slug
    best, too_far = None, []
    size = DTYPES[call.dtype].size
    for v, r, base in _candidates(op.name, dev, be):
        if r["dtype"] != call.dtype or not v.supports(call.shape, call.dtype):
            continue
        ratio = op.bytes(call.shape, size) / max(op.bytes(r["shape"], size), 1)
        if not 1 / MAX_EXTRAPOLATION <= ratio <= MAX_EXTRAPOLATION:
            too_far.append(r["shape_str"])  # a winner at 64 MB says nothing about a 16 KB launch
            continue
        ms = r["timing"]["median_ms"]
        if base is None or ms >= base:
            continue  # never use a variant that lost to the built-in where it was measured
        key = (_distance(r["shape"], call.shape), ms)
        if best is None or key < best[0]:
            best = (key, v, r, base)
    if best is None:
        untrusted = sorted({r["source"] for r in store.load(dev, op.name)
                            if not hub.is_trusted(r.get("source", "local"))})
        note = (f" ({len(untrusted)} untrusted pack(s) ignored: {', '.join(untrusted)}; see `hlh_mlx trust`)"
                if untrusted else "")
        if too_far:
            note += (f" (tuned only at {', '.join(sorted(set(too_far)))}: more than {MAX_EXTRAPOLATION}x "
                     f"away in bytes moved; sweep --shape {op.shape_str(call.shape)} to tune this size)")
        return Choice(None, None, f"no stored {op.name} variant beats the built-in for {call.dtype} on {dev} [{be}]{note}")
    (dist, _), v, r, base = best
    how = "exact shape" if dist == 0 else f"nearest tuned shape {r['shape_str']}"
    return Choice(v, r, f"{how}, {base / r['timing']['median_ms']:.2f}x the built-in there")


_launches: dict = {}  # (op, shape, dtype) -> (kernel, output shapes, output dtypes)


def _launch_for(op, call, choice):
    key = (op.name, tuple(call.shape.items()), call.dtype)
    if key not in _launches:
        v = choice.variant
        kkey = (v.id, _backend())
        if kkey not in _kernels:
            _kernels[kkey] = backends.Kernel(v, _backend())
        _launches[key] = (_kernels[kkey], op.output_shapes(call.shape), op.output_dtypes(DTYPES[call.dtype]))
    return _launches[key]


_TUNED_DTYPES = frozenset(DTYPES.values())


def _bind(op, args, kwargs):
    """The op's Call for these arguments, or why no tuned kernel serves them."""
    if args and isinstance(args[0], mx.array) and args[0].dtype not in _TUNED_DTYPES:
        return f"dtype {args[0].dtype} has no tuned kernels (only {', '.join(DTYPES)})"
    return op.bind(*args, **kwargs)


_choice_memo: dict = {}  # (op, argument shapes/dtypes/values) -> Choice


def _memo_key(op_name: str, args, kwargs):
    """What decides a call's choice without binding it: array shapes and dtypes, other
    argument values; None when an argument cannot be a key, or is a one-element array
    (a value passed as an array, like rope's offset, which binding may check)."""
    parts = [op_name, tuple(kwargs)]
    for a in (*args, *kwargs.values()):
        if isinstance(a, mx.array):
            if a.size == 1:
                return None
            parts.append((a.shape, a.dtype))
        else:
            parts.append(a)
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _choice_for(op_name: str, args, kwargs) -> Choice:
    """The choice for these arguments, remembered by their shapes before binding: a decode
    loop makes the same calls thousands of times, and binding validates in Python."""
    key = _memo_key(op_name, args, kwargs)
    choice = _choice_memo.get(key) if key is not None else None
    if choice is None:
        choice = choose(op_name, _bind(ops.get(op_name), args, kwargs))
        if key is not None:
            if len(_choice_memo) >= 4096:  # e.g. one key per rope offset: stay bounded
                _choice_memo.clear()
            _choice_memo[key] = choice
    return choice


def _fallback(op_name: str, choice: Choice, builtin, *args, **kwargs):
    if os.environ.get("HLH_MLX_STRICT", "") not in ("", "0") and not _lenient:
        raise FallbackError(f"[hlh_mlx.tuned.{op_name}] HLH_MLX_STRICT=1 and the built-in would run: {choice.reason}")
    _fallbacks[(op_name, choice.reason)] += 1
    return builtin(*args, **kwargs)


def _run(op_name: str, builtin, *args, **kwargs):
    choice = _choice_for(op_name, args, kwargs)
    if choice.variant is None:
        return _fallback(op_name, choice, builtin, *args, **kwargs)
    op = ops.get(op_name)
    call = _bind(op, args, kwargs)  # the kernel's inputs in the op's layout
    kernel, out_shapes, out_dtypes = _launch_for(op, call, choice)
    return call.finish(kernel(call.inputs, call.shape, call.dtype, out_shapes, out_dtypes))


def _with_builtin_grad(tuned_fn, builtin_fn):
    """tuned_fn forward, the built-in's gradient backward (mx.custom_function): training
    through a tuned norm, SwiGLU or RoPE gets exactly MLX's own derivatives."""
    f = mx.custom_function(tuned_fn)

    @f.vjp
    def _vjp(primals, cotangent, output):
        one = isinstance(primals, mx.array)  # MLX passes a single primal bare
        _, grads = mx.vjp(builtin_fn, [primals] if one else list(primals), [cotangent])
        return grads[0] if one else tuple(grads)
    return f


_grad_fns: dict = {}


def _differentiable(key, tuned_fn, builtin_fn, *arrays, bind_args=None):
    """Call the tuned forward with the built-in's VJP; non-array arguments are in `key`
    (and closed over by the two functions), so one custom function serves each setting.
    When no tuned kernel serves the call, the built-in runs directly: a custom function
    costs ~2.5 us of host time per call, which a decode loop pays ~50 times a token."""
    op_name = key[0]
    choice = _choice_for(op_name, *(bind_args or (arrays, {})))
    if choice.variant is None:
        return _fallback(op_name, choice, builtin_fn, *arrays)
    if key not in _grad_fns:
        if len(_grad_fns) >= 512:  # e.g. one per rope offset of a decode loop: stay bounded
            _grad_fns.clear()
        _grad_fns[key] = _with_builtin_grad(tuned_fn, builtin_fn)
    return _grad_fns[key](*arrays)


class lenient:
    """Within this block a fallback is never an error (HLH_MLX_STRICT notwithstanding):
    for checks on made-up inputs, whose shapes nobody tuned for."""

    def __enter__(self):
        global _lenient
        self._was, _lenient = _lenient, True

    def __exit__(self, *exc):
        global _lenient
        _lenient = self._was


def explain(op_name: str, *args, **kwargs) -> str:
    """Which variant (id, parameters, measured speed) or the built-in would run, and why."""
    return str(choose(op_name, _bind(ops.get(op_name), args, kwargs)))


def fallbacks() -> dict:
    """{(op, reason): count} of calls that ran the built-in."""
    return dict(_fallbacks)


def refresh() -> None:
    """Forget cached results, kernels and fallback counts (after a sweep in this process)."""
    _fallbacks.clear()
    _candidates.cache_clear()
    current_variants.cache_clear()
    _backend.cache_clear()
    _kernels.clear()
    _grad_fns.clear()
    _choices.clear()
    _launches.clear()
    _choice_memo.clear()


def softmax(x, axis=-1, **kwargs):
    return _run("softmax", lambda x, axis=-1, **kw: mx.softmax(x, axis=axis, **kw), x, axis=axis, **kwargs)


def rms_norm(x, weight, eps):
    if weight is None:
        return _run("rms_norm", mx.fast.rms_norm, x, weight, eps)
    return _differentiable(("rms_norm", eps), lambda x, w: _run("rms_norm", mx.fast.rms_norm, x, w, eps),
                           lambda x, w: mx.fast.rms_norm(x, w, eps), x, weight, bind_args=((x, weight, eps), {}))


def layer_norm(x, weight, bias, eps):
    if weight is None or bias is None:
        return _run("layer_norm", mx.fast.layer_norm, x, weight, bias, eps)
    return _differentiable(("layer_norm", eps), lambda x, w, b: _run("layer_norm", mx.fast.layer_norm, x, w, b, eps),
                           lambda x, w, b: mx.fast.layer_norm(x, w, b, eps), x, weight, bias,
                           bind_args=((x, weight, bias, eps), {}))


def _silu_mul(g, u):
    import mlx.nn as nn
    return nn.silu(g) * u


def swiglu(g, u):
    """silu(g) * u."""
    return _differentiable(("swiglu",), lambda g, u: _run("swiglu", _silu_mul, g, u), _silu_mul, g, u)


def rope(x, dims, *, traditional, base, scale, offset, freqs=None):
    """mx.fast.rope; the gradient is mx.fast.rope's own."""
    kw = dict(traditional=traditional, base=base, scale=scale, freqs=freqs)
    if not isinstance(offset, int) or freqs is not None:  # array offsets and freqs: no closure key
        return _run("rope", mx.fast.rope, x, dims, offset=offset, **kw)
    key = ("rope", dims, traditional, base, scale, offset)
    return _differentiable(key, lambda x: _run("rope", mx.fast.rope, x, dims, offset=offset, **kw),
                           lambda x: mx.fast.rope(x, dims, offset=offset, **kw), x,
                           bind_args=((x, dims), dict(offset=offset, **kw)))


def gemv(x, w):
    """x @ w.T for a few rows of x (what nn.Linear computes at decode)."""
    return _run("gemv", lambda x, w: x @ w.T, x, w)


def quantized_matmul(x, w, scales, biases=None, transpose=True, group_size=64, bits=4, **kwargs):
    """mx.quantized_matmul; tuned for one token, 4-bit affine weights, transpose=True."""
    return _run("qgemv", mx.quantized_matmul, x, w, scales, biases, transpose=transpose,
                group_size=group_size, bits=bits, **kwargs)


def scaled_dot_product_attention(q, k, v, *, scale, mask=None, **kwargs):
    """mx.fast.scaled_dot_product_attention; tuned for one query token (decode)."""
    return _run("decode_attention", mx.fast.scaled_dot_product_attention, q, k, v, scale=scale, mask=mask, **kwargs)


qgemv = quantized_matmul
decode_attention = scaled_dot_product_attention


def gelu(x):
    import mlx.nn as nn
    return _run("gelu", nn.gelu, x)


def matmul(a, b):
    return _run("matmul", mx.matmul, a, b)
