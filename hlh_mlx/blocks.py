"""Decoder blocks of mlx-lm models whose decode step costs two Python calls, not fifteen.

A decode step of a Llama-style block makes ~15 small calls (norms, projections, RoPE, cache
update, attention, MLP, residual adds); each costs microseconds of Python and graph building
while the GPU work of one is a few microseconds too, so a patched model is host-bound unless
the calls are few. `DecoderBlock` keeps an mlx-lm block's children (same parameter names:
checkpoints load unchanged) and runs its decode step as

    q, k, v = pre(x, offset)             # compiled: norm, q/k/v projections (+ q/k norms), RoPE
    k, v = cache.update_and_fetch(k, v); o = attention(q, k, v)
    out = post(x, o)                     # compiled: o projection, residual, norm, MLP, residual

where `pre` and `post` are `mx.compile`d with every weight of the block passed as an input
(never baked in as a constant: weights loaded after patching are used). Prefill and training
run the same code uncompiled. With `fused=True` the residual add and the second norm are
one op (`add_rms_norm`), so a tuned kernel can serve both.

The block is recognised by structure (mlx-lm's llama, mistral, qwen2, qwen3 blocks, and
MoE blocks of the same layout) and `hlh_mlx.patch` installs it in quantized models only,
after it computes what the original block computes, at a prefill and at decode steps
through a KV cache.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import runtime, tuned
from .ops.rope import _offset_array as offset_array

_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope")
_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def why_not(block) -> str | None:
    """None when `block` has the structure DecoderBlock reproduces, else what is missing."""
    kids = block.children() if isinstance(block, nn.Module) else {}
    missing = [k for k in _BLOCK_PARTS if k not in kids]
    if missing:
        return f"no {', '.join(missing)}"
    attn = kids["self_attn"]
    missing = [k for k in _ATTENTION_PARTS if k not in attn] + \
              [k for k in ("n_heads", "n_kv_heads", "scale") if not hasattr(attn, k)]
    if missing:
        return f"self_attn has no {', '.join(missing)}"
    norm = kids["post_attention_layernorm"]
    if not isinstance(norm, nn.Module) or "weight" not in norm or not hasattr(norm, "eps"):
        return "post_attention_layernorm has no weight and eps (an RMSNorm)"
    return None


def quantized(block: nn.Module) -> bool:
    """The block's projections hold quantized weights: its decode step reads few bytes, so
    the per-call cost of Python and graph building is what bounds it, and a compiled step
    pays. Unquantized blocks are bound by weight reads (benchmarks/results/llm_models_h200.md)."""
    return any(isinstance(m, nn.QuantizedLinear) for m in block.modules())


class _Compiled:
    """fn(*xs) compiled, with every array held by `root`'s module tree passed in as an input
    each call (gathered from their slots: a weight replaced in place is picked up)."""

    def __init__(self, root: nn.Module, fn):
        self.slots = _slots(root)

        def traced(*arrays):
            n = len(self.slots)
            saved = [parent[key] for parent, key in self.slots]
            for (parent, key), a in zip(self.slots, arrays[:n]):
                parent[key] = a
            try:
                return fn(*arrays[n:])
            finally:
                for (parent, key), a in zip(self.slots, saved):
                    parent[key] = a
        self.fn = mx.compile(traced)

    def __call__(self, *xs):
        return self.fn(*[parent[key] for parent, key in self.slots], *xs)


def _slots(module: nn.Module) -> list:
    out = []

    def walk(m):
        for k, v in m.items():
            if isinstance(v, mx.array):
                out.append((m, k))
            elif isinstance(v, nn.Module):
                walk(v)
            elif isinstance(v, (list, tuple)):
                for c in v:
                    if isinstance(c, nn.Module):
                        walk(c)
    walk(module)
    return out


class DecoderBlock(nn.Module):
    """A pre-norm decoder block (mlx-lm's llama/qwen2/qwen3 layout) with a compiled decode step.

    Args:
        block: the mlx-lm block; its children are kept as they are.
        fused: the residual add and the second norm through hlh_mlx.tuned.add_rms_norm.
    """

    def __init__(self, block: nn.Module, fused: bool = True):
        super().__init__()
        for k in _BLOCK_PARTS:
            self[k] = block[k]
        for k, v in vars(block).items():  # plain attributes the model may read (use_sliding, args)
            if not k.startswith("_") and k not in vars(self):
                object.__setattr__(self, k, v)
        object.__setattr__(self, "_fused", fused)
        object.__setattr__(self, "_compiled", None)
        self.train(block.training)  # a new Module starts in training mode; an eval-mode model stays in eval

    def reset(self) -> None:
        """Forget the compiled step (after children are replaced)."""
        object.__setattr__(self, "_compiled", None)

    def _children_key(self):
        """Which modules and which decisions the compiled step was traced with (patching
        replaces children; hlh_mlx.tuned.refresh() after a sweep changes what a call runs)."""
        key = [runtime.generation[0]]
        for k in _BLOCK_PARTS:
            m = self[k]
            key.append(id(m))
            key += [id(c) for c in m.values() if isinstance(c, nn.Module)]
        return tuple(key)

    def _qkv(self, x, offset):
        """Queries and keys rotated to `offset` (an int, or a (1,) array inside the compiled step),
        and values, each (B, heads, T, head_dim)."""
        a = self["self_attn"]
        b, t, _ = x.shape
        h = self["input_layernorm"](x)
        q, k, v = a.q_proj(h).reshape(b, t, a.n_heads, -1), a.k_proj(h).reshape(b, t, a.n_kv_heads, -1), \
            a.v_proj(h).reshape(b, t, a.n_kv_heads, -1)
        if "q_norm" in a:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        return a.rope(q, offset=offset), a.rope(k, offset=offset), v.transpose(0, 2, 1, 3)

    def _out(self, x, o):
        b, t, _ = x.shape
        r = self["self_attn"].o_proj(o.transpose(0, 2, 1, 3).reshape(b, t, -1))
        norm = self["post_attention_layernorm"]
        if self._fused:
            f = tuned.add_rms_norm if self.training else tuned.add_rms_norm.no_grad
            h, y = f(x, r, norm["weight"], norm.eps)
        else:
            h = x + r
            y = norm(h)
        return h + self["mlp"](y)

    def _steps(self):
        key = self._children_key()
        c = self._compiled
        if c is None or c[0] != key:
            c = (key, _Compiled(self, self._qkv), _Compiled(self, self._out))
            object.__setattr__(self, "_compiled", c)
        return c[1], c[2]

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        from mlx_lm.models.base import scaled_dot_product_attention
        offset = cache.offset if cache is not None else 0
        if x.shape[1] == 1 and not self.training:
            qkv, out = self._steps()
            offset = offset_array(offset)  # data, so one trace serves every step
        else:  # prefill and training: shapes vary, the host cost is small beside the work
            qkv, out = self._qkv, self._out
        q, k, v = qkv(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self["self_attn"].scale, mask=mask)
        return out(x, o)


def differs(old: nn.Module, new: nn.Module, dims: int, dtype) -> str | None:
    """None when `new` computes what `old` does: a 5-token prefill (causal mask), then three
    decode steps, each side through its own KV cache; else what differs."""
    import numpy as np
    from mlx_lm.models.cache import KVCache
    rng = np.random.default_rng(0)
    xs = [mx.array(rng.standard_normal((1, t, dims)).astype(np.float32)).astype(dtype) for t in (5, 1, 1, 1)]
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    caches = (KVCache(), KVCache())
    try:
        with tuned.lenient():
            for i, x in enumerate(xs):
                mask = "causal" if x.shape[1] > 1 else None
                a = old(x, mask, caches[0]).astype(mx.float32)
                b = new(x, mask, caches[1]).astype(mx.float32)
                mx.eval(a, b)
                if a.shape != b.shape:
                    return f"output shape {b.shape} instead of {a.shape}"
                scale = max(float(mx.max(mx.abs(a))), 1.0)
                err = float(mx.max(mx.abs(a - b)))
                if err > tol * scale:
                    return f"differs at {'prefill' if i == 0 else f'decode step {i}'} " \
                           f"(max abs error {err:.3g}, tolerance {tol * scale:.3g})"
    except Exception as e:  # whatever the block raises: report it, keep the block
        return f"the numeric check raised {type(e).__name__}: {e}"
    return None
