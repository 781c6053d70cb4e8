"""A whole model's decode step as one compiled call.

A patched decode step is host-bound: each block's two compiled halves, its KV-cache update
and its attention cost Python and graph building per block per token, while the GPU work
of a block is a few hundred microseconds. `DecodeStack` wraps an mlx-lm model's inner
stack (`embed_tokens`, `layers`, `norm`: llama, mistral, qwen2, qwen3 and their MoE kin)
and runs a one-token step through it as ONE `mx.compile`d function:

    h = embed_tokens(token)
    for each block: q, k, v = pre(h, offset); keys[offset] = k; values[offset] = v
                    h = post(h, attention(q, keys, values, rows <= offset))
    return norm(h)

Its shapes never change between steps: the KV cache is read whole (mlx-lm's KVCache keeps
its keys in a buffer grown 256 rows at a time) with the rows past the offset masked out,
and the offset is data (a (1,) array), so one trace serves every step until the buffer
grows. Every array the stack's modules hold is passed in as an input (never baked in):
weights loaded after patching are used. Anything else (prefill, several sequences,
another cache type, training) runs the wrapped model as it is.

Parameter names are unchanged (the stack holds the same children), so checkpoints load as
before; `hlh_mlx.patch` installs it over blocks it has patched and checks it computes what
the model computes over a prefill and decode steps.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import blocks, runtime
from .ops.rope import _offset_array as offset_array

_PARTS = ("embed_tokens", "layers", "norm")


def why_not(inner) -> str | None:
    """None when `inner` is a stack DecodeStack runs, else what is missing."""
    if not isinstance(inner, nn.Module) or isinstance(inner, DecodeStack):
        return "not a model stack"
    missing = [k for k in _PARTS if k not in inner]
    if missing:
        return f"no {', '.join(missing)}"
    layers = inner["layers"]
    if not isinstance(layers, list) or not layers:
        return "no list of layers"
    if any(getattr(b, "use_sliding", False) for b in layers):
        return "sliding-window attention layers"
    if not all(isinstance(b, blocks.DecoderBlock) for b in layers):
        return "not every layer is a decoder block hlh_mlx runs (hlh_mlx.blocks.DecoderBlock)"
    return None


def _grow(cache, n: int = 1) -> None:
    """Room for n more rows, as mlx-lm's KVCache.update_and_fetch makes it (whole steps of
    `cache.step` rows), so the cache stays one mlx-lm can go on with."""
    prev = cache.offset
    if prev + n <= cache.keys.shape[2]:
        return
    b, h, _, dk = cache.keys.shape
    rows = ((cache.step + n - 1) // cache.step) * cache.step
    new_k = mx.zeros((b, h, rows, dk), cache.keys.dtype)
    new_v = mx.zeros((b, h, rows, cache.values.shape[3]), cache.values.dtype)
    if prev % cache.step != 0:
        cache.keys, cache.values = cache.keys[..., :prev, :], cache.values[..., :prev, :]
    cache.keys = mx.concatenate([cache.keys, new_k], axis=2)
    cache.values = mx.concatenate([cache.values, new_v], axis=2)


class DecodeStack(nn.Module):
    """`inner` (an mlx-lm model's embed_tokens, layers, norm) with its one-token steps run
    as one compiled call (module docstring); every other call goes to `inner` itself."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        for k in _PARTS:
            self[k] = inner[k]
        for k, v in vars(inner).items():  # plain attributes callers may read (args, num_layers)
            if not k.startswith("_") and k not in vars(self):
                object.__setattr__(self, k, v)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_traced", None)  # (key, watched children, compiled step)
        self.train(inner.training)

    def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
        if self._fits(inputs, cache, input_embeddings, kwargs):
            return self._decode(inputs, cache)
        if input_embeddings is not None:  # not every model takes them (qwen2_moe does not)
            kwargs["input_embeddings"] = input_embeddings
        return self._inner(inputs, cache, **kwargs)

    def _fits(self, inputs, cache, input_embeddings, kwargs) -> bool:
        if self.training or input_embeddings is not None or kwargs or cache is None \
                or inputs.shape != (1, 1) or len(cache) != len(self["layers"]):
            return False
        from mlx_lm.models.cache import KVCache
        offset = cache[0].offset
        return all(type(c) is KVCache and c.keys is not None and c.offset == offset for c in cache)

    def _decode(self, inputs, cache):
        for c in cache:
            _grow(c)
        step = self._step(inputs)
        kv = [a for c in cache for a in (c.keys, c.values)]
        for c in cache:  # the step's graph holds the only reference: the update can be in place
            c.keys = c.values = None
        out, *kv = step(inputs, offset_array(cache[0].offset), *kv)
        for i, c in enumerate(cache):
            c.keys, c.values = kv[2 * i], kv[2 * i + 1]
            c.offset += 1
        return out

    def _step(self, inputs):
        """The compiled step, traced again when a layer or a decision changed."""
        t = self._traced
        if t is not None and t[0] == (runtime.generation[0], blocks.resets[0]) and all(p[k] is m for p, k, m in t[1]):
            return t[2]
        layers = self["layers"]
        x = mx.zeros((1, 1, self["norm"]["weight"].shape[0]), self["norm"]["weight"].dtype)
        halves = [b.step_functions(x) for b in layers]

        def step(tokens, offset, *kv):
            h = self["embed_tokens"](tokens)
            s = kv[0].shape[2]
            mask = mx.arange(s, dtype=mx.int32) <= offset
            out = []
            for i, (b, (pre, post)) in enumerate(zip(layers, halves)):
                h, k, v = b.decode_in_place(h, offset, kv[2 * i], kv[2 * i + 1], mask, pre, post)
                out += [k, v]
            return (self["norm"](h), *out)
        compiled = blocks._Compiled([self], step)
        t = ((runtime.generation[0], blocks.resets[0]), _children(self), compiled)
        object.__setattr__(self, "_traced", t)
        return compiled


def differs(inner: nn.Module, stack: DecodeStack) -> str | None:
    """None when `stack` computes what `inner` does over a 5-token prefill and then decode
    steps across a KV-cache buffer's growth (each side through its own caches), else what
    differs (a check that raises counts: the stack is not installed)."""
    import numpy as np
    from mlx_lm.models.cache import KVCache
    vocab = inner["embed_tokens"]["weight"].shape[0]
    tokens = np.random.default_rng(0).integers(0, vocab, 5 + 4).tolist()
    n = len(inner["layers"])
    caches = ([KVCache() for _ in range(n)], [KVCache() for _ in range(n)])
    dtype = inner["norm"]["weight"].dtype
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    try:
        from . import tuned
        with tuned.lenient():
            for i, t in enumerate([tokens[:5]] + [[t] for t in tokens[5:]]):
                x = mx.array([t])
                if i == 2:  # the next steps cross the end of the buffer: it grows mid-decode
                    for c in caches[0] + caches[1]:
                        c.keys, c.values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
                a = inner(x, caches[0]).astype(mx.float32)
                b = stack(x, caches[1]).astype(mx.float32)
                mx.eval(a, b)
                if a.shape != b.shape:
                    return f"output shape {b.shape} instead of {a.shape}"
                scale = max(float(mx.max(mx.abs(a))), 1.0)
                err = float(mx.max(mx.abs(a - b)))
                if err > tol * scale:
                    return f"differs at {'prefill' if i == 0 else f'decode step {i}'} " \
                           f"(max abs error {err:.3g}, tolerance {tol * scale:.3g})"
    except Exception as e:  # whatever the step raises: report it, keep the model's own
        return f"the numeric check raised {type(e).__name__}: {e}"
    return None


def _children(module) -> list:
    """(container, key, child) for every module under `module`: the step was traced with
    these, and is traced again if any is replaced."""
    out = []

    def walk(m):
        for k, v in m.items():
            if isinstance(v, nn.Module):
                out.append((m, k, v))
                walk(v)
            elif isinstance(v, list):
                for i, c in enumerate(v):
                    if isinstance(c, nn.Module):
                        out.append((v, i, c))
                        walk(c)
    walk(module)
    return out
