"""Decoder blocks of mlx-lm models whose decode step costs two Python calls, not fifteen.

A decode step of a Llama-style block makes ~15 small calls (norms, projections, RoPE, cache
update, attention, MLP, residual adds); each costs microseconds of Python and graph building
while the GPU work of one is a few microseconds too, so a patched model is host-bound unless
the calls are few. `DecoderBlock` keeps an mlx-lm block's children (same parameter names:
checkpoints load unchanged) and runs its decode step as

    q, k, v = pre(x, offset)             # compiled: norm, q/k/v projections (+ q/k norms), RoPE
    k, v = cache.update_and_fetch(k, v); o = attention(q, k, v)
    out = post(x, o)                     # compiled: o projection, residual, norm, MLP, residual

where `pre` and `post` are `mx.compile`d with every weight they read passed as an input
(never baked in as a constant: weights loaded after patching are used). Prefill and training
run the same code uncompiled.

With `fused=True`, each half of the decode step whose layers the fused kernels take (4-bit
affine projections of one group size, plain RMSNorms, a RoPE the kernel serves; biases on
q/k/v only, as Qwen2's) runs as fused ops, each a tuned kernel where one beats the built-ins
it replaces (else the half runs unfused):

    pre:  q, k, v = norm_qkv_rope(x, ...)          # norm, q/k/v projections, RoPE: 6 launches -> 1
          q, k = qk_norm_rope(q, k, ...)           # Qwen3: the projections unrotated above (offset
                                                   #   0), then the heads' norms and RoPE: 4 -> 1
    post: h = qgemv_add(o, Wo, x)                  # o projection + residual: 3 -> 1 (o as attention
                                                   #   leaves it: no reshape)
          y = norm_qgemv_swiglu(h, ...)            # norm, gate, up, SwiGLU: 4 -> 1 (or -> 2:
                                                   #   rms_norm, qgemv_swiglu, if cheaper)
          out = qgemv_add(y, Wd, h)                # down projection + residual: 2 -> 1

A half the fused ops do not take (other quantizations or RoPE scalings; an MoE MLP, whose
routing and experts `hlh_mlx.moe` fuses instead) runs as the children do, with the residual
add and the second norm as one op (`add_rms_norm`).

The block is recognised by structure (mlx-lm's llama, mistral, qwen2, qwen3 blocks, and
MoE blocks of the same layout, Mixtral's too: its MLP is `block_sparse_moe`, its attention
counts heads as `num_heads`) and `hlh_mlx.patch` installs it in quantized models only,
after it computes what the original block computes, at a prefill and at decode steps
through a KV cache.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import moe, ops, runtime, tuned
from .ops.rope import _offset_array as offset_array, offset_input, offset_scalar
from .ops.spec import QUANT_GROUPS

_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope")
_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm")  # and the MLP's slot
# attention's head counts as mlx-lm's classes name them: (queries, keys and values)
_HEAD_COUNTS = (("n_heads", "n_kv_heads"), ("num_heads", "num_key_value_heads"))


def mlp_slot(block) -> str | None:
    """The name under which `block` holds its MLP (its parameters keep it), or None. Mixtral's
    slot only for an MoE block whose routing hlh_mlx.moe knows (PhiMoE's and GraniteMoE's
    blocks use the name too, around computations this block does not reproduce)."""
    kids = block.children() if isinstance(block, nn.Module) else {}
    if "mlp" in kids:
        return "mlp"
    moe_mlp = kids.get("block_sparse_moe")
    return "block_sparse_moe" if type(moe_mlp).__name__ in moe.ROUTERS else None


def head_counts(attn) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an attention module, or None where it names neither."""
    for names in _HEAD_COUNTS:
        counts = [getattr(attn, n, None) for n in names]
        if all(isinstance(c, int) and c > 0 for c in counts):
            return counts[0], counts[1]
    return None


def why_not(block) -> str | None:
    """None when `block` has the structure DecoderBlock reproduces, else what is missing."""
    kids = block.children() if isinstance(block, nn.Module) else {}
    missing = [k for k in _BLOCK_PARTS if k not in kids] + ([] if mlp_slot(block) else ["mlp"])
    if "block_sparse_moe" in kids and not mlp_slot(block):
        return (f"its MLP (block_sparse_moe) is a {type(kids['block_sparse_moe']).__name__}, not an MoE block "
                f"hlh_mlx.moe reproduces ({', '.join(moe.ROUTERS)})")
    if missing:
        return f"no {', '.join(missing)}"
    attn = kids["self_attn"]
    missing = [k for k in _ATTENTION_PARTS if k not in attn] + \
              ([] if head_counts(attn) else ["n_heads and n_kv_heads (or num_heads and num_key_value_heads)"]) + \
              ([] if hasattr(attn, "scale") else ["scale"])
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
    """fn(*xs) compiled, with every array held by the module trees of `roots` passed in as
    an input each call (gathered from their slots: a weight replaced in place is picked up).
    `fn` must read no other module's arrays (they would be traced as constants)."""

    def __init__(self, roots: list, fn):
        self.slots = [s for root in roots for s in _slots(root)]

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
        self.plain = fn  # the same step uncompiled (reads the modules' arrays itself)

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
        fused: True: the decode step's fused ops (module docstring) where a stored variant serves
            them, else the residual add and the second norm through hlh_mlx.tuned.add_rms_norm;
            "always": the fused ops even where their built-in composition would run; False: neither.
    """

    def __init__(self, block: nn.Module, fused: bool = True):
        super().__init__()
        object.__setattr__(self, "_parts", _BLOCK_PARTS + (mlp_slot(block),))  # the MLP under its own name
        for k in self._parts:
            self[k] = block[k]
        for k, v in vars(block).items():  # plain attributes the model may read (use_sliding, args)
            if not k.startswith("_") and k not in vars(self):
                object.__setattr__(self, k, v)
        object.__setattr__(self, "_fused", fused)
        object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, "_freqs", None)  # RoPE's freqs for the fully fused step
        object.__setattr__(self, "_zero", None)   # offset 0 (norm_qkv_rope unrotated, before head norms)
        object.__setattr__(self, "_mlp_fused", True)  # post half: norm_qgemv_swiglu (else rms_norm, qgemv_swiglu)
        object.__setattr__(self, "mlp_form", None)  # "fused" or "split" overrides the store's pick
        object.__setattr__(self, "_moe_fused", False)  # decode: routing and experts as fused ops (hlh_mlx.moe)
        object.__setattr__(self, "_heads", head_counts(block["self_attn"]))  # (query, key/value) heads
        self.train(block.training)  # a new Module starts in training mode; an eval-mode model stays in eval

    @property
    def mlp_module(self) -> nn.Module:
        """The block's MLP (dense, or an MoE's router and experts), whatever its slot's name."""
        return self[self._parts[-1]]

    def reset(self) -> None:
        """Forget the compiled step (after children are replaced)."""
        object.__setattr__(self, "_compiled", None)

    def _children_key(self):
        """Which modules and which decisions the compiled step was traced with (patching
        replaces children; hlh_mlx.tuned.refresh() after a sweep changes what a call runs)."""
        key = [runtime.generation[0]]
        for k in self._parts:
            m = self[k]
            key.append(id(m))
            key += [id(c) for c in m.values() if isinstance(c, nn.Module)]
        mlp = self.mlp_module
        if type(mlp).__name__ in moe.ROUTERS:  # an MoE's experts and shared expert are a level deeper
            key += [id(g) for c in mlp.values() if isinstance(c, nn.Module)
                    for g in c.values() if isinstance(g, nn.Module)]
        return tuple(key)

    def _qkv(self, x, offset):
        """Queries and keys rotated to `offset` (an int, or a (1,) array inside the compiled step),
        and values, each (B, heads, T, head_dim)."""
        a = self["self_attn"]
        b, t, _ = x.shape
        h = self["input_layernorm"](x)
        # one token: (B, 1, heads, D) and (B, heads, 1, D) are the same memory, so a reshape
        # gives the heads-first layout without the transposes (graph nodes the host pays for)
        shape = (lambda n: (b, n, 1, -1)) if t == 1 else (lambda n: (b, t, n, -1))
        nq, nkv = self._heads
        q, k, v = a.q_proj(h).reshape(shape(nq)), a.k_proj(h).reshape(shape(nkv)), a.v_proj(h).reshape(shape(nkv))
        if self.has_head_norms():
            q, k = a.q_norm(q), a.k_norm(k)  # over the last axis: either layout
        if t != 1:
            q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return a.rope(q, offset=offset), a.rope(k, offset=offset), v

    def _out(self, x, o):
        b, t, _ = x.shape
        o = o.reshape(b, 1, -1) if t == 1 else o.transpose(0, 2, 1, 3).reshape(b, t, -1)
        r = self["self_attn"].o_proj(o)
        norm = self["post_attention_layernorm"]
        if self._fused:
            f = tuned.add_rms_norm if self.training else tuned.add_rms_norm.no_grad
            h, y = f(x, r, norm["weight"], norm.eps)
        else:
            h = x + r
            y = norm(h)
        mlp = self.mlp_module
        # the expert ops have no gradient: training runs the MLP as it is
        return h + (moe.decode(mlp, y) if t == 1 and self._moe_fused and not self.training else mlp(y))

    def why_not_fully_fused(self) -> str | None:
        """None when the decode step runs as the four fused ops (module docstring), else why not."""
        return self.why_not_fused_pre() or self.why_not_fused_post()

    def why_not_fused_pre(self) -> str | None:
        """None when the pre half can run as norm_qkv_rope (4-bit affine q/k/v projections,
        with or without biases, an RMSNorm, a RoPE the kernel takes), followed by
        qk_norm_rope where the heads have norms of their own (Qwen3), else why not."""
        why = self._why_not_fused("norm_qkv_rope")
        if why:
            return why
        a = self["self_attn"]
        why = _why_not_4bit([a[k] for k in ("q_proj", "k_proj", "v_proj")], biases=True)
        if why:
            return why
        if not isinstance(self["input_layernorm"], nn.RMSNorm):
            return f"input_layernorm is a {type(self['input_layernorm']).__name__}, not an RMSNorm"
        if self._head_dim() is None:
            return "q_proj's outputs are not n_heads whole heads"
        if self.has_head_norms():
            why = self._why_not_fused("qk_norm_rope") or self._why_not_head_norms()
            if why:
                return why
        if rope_freqs(a.rope, self._head_dim()) is None:
            return (f"RoPE {type(a.rope).__name__} (dims {getattr(a.rope, 'dims', '?')}, "
                    f"traditional {getattr(a.rope, 'traditional', '?')}) is not one the fused kernel takes")
        return None

    def why_not_fused_post(self) -> str | None:
        """None when the post half can run as qgemv_add, norm_qgemv_swiglu, qgemv_add (4-bit
        affine o/gate/up/down projections without biases, one format, an RMSNorm), else why not."""
        why = self._why_not_fused("qgemv_add", "norm_qgemv_swiglu")
        if why:
            return why
        mlp = self.mlp_module
        if not all(k in mlp for k in ("gate_proj", "up_proj", "down_proj")):
            return "the MLP is not gate/up/down projections (experts?)"
        why = _why_not_4bit([self["self_attn"].o_proj] + [mlp[k] for k in ("gate_proj", "up_proj", "down_proj")])
        if why:
            return why
        if not isinstance(self["post_attention_layernorm"], nn.RMSNorm):
            return f"post_attention_layernorm is a {type(self['post_attention_layernorm']).__name__}, not an RMSNorm"
        return None

    def has_head_norms(self) -> bool:
        """Whether queries and keys are normed per head before RoPE (Qwen3's q_norm, k_norm)."""
        return "q_norm" in self["self_attn"]

    def _why_not_head_norms(self) -> str | None:
        """None when q_norm and k_norm are what qk_norm_rope computes: RMSNorms over a head
        (weights of head_dim) with one eps between them."""
        a = self["self_attn"]
        norms = [a[k] if k in a else None for k in ("q_norm", "k_norm")]
        if not all(isinstance(n, nn.RMSNorm) for n in norms):
            return "the queries' and keys' norms are not both RMSNorms (q_norm, k_norm)"
        d = self._head_dim()
        if any(n["weight"].shape != (d,) for n in norms):
            return f"the queries' and keys' norms are not over a head of {d} values"
        if norms[0].eps != norms[1].eps:
            return f"the queries' and keys' norms have different eps ({norms[0].eps}, {norms[1].eps})"
        return None

    def _why_not_fused(self, *op_names) -> str | None:
        if not self._fused:
            return "fused=False"
        missing = [o for o in op_names if o not in ops.names()]
        return f"no op {', '.join(missing)}" if missing else None

    def _head_dim(self) -> int | None:
        a = self["self_attn"]
        n = a.q_proj.weight.shape[0]
        return n // self._heads[0] if n % self._heads[0] == 0 else None

    # The fused step's calls as (args, kwargs): what the step runs and what
    # `_fused_steps_that_pay` weighs must be the same calls.
    def _qkv_call(self, x, offset):
        a, norm = self["self_attn"], self["input_layernorm"]
        # Qwen2's projections carry biases, Llama's none (then none are passed: the op's B=0)
        biases = {f"{n}_bias": a[f"{n}_proj"]["bias"] for n in "qkv" if "bias" in a[f"{n}_proj"]}
        return ((x, norm["weight"], norm.eps, *_packed(a.q_proj), *_packed(a.k_proj), *_packed(a.v_proj),
                 self._freqs, offset, self._head_dim()), {"group_size": a.q_proj.group_size, "bits": 4,
                                                          "heads_first": True, **biases})

    @staticmethod
    def _add_call(proj, y, residual):
        return (y, *_packed(proj), residual), {"group_size": proj.group_size, "bits": 4}

    def _mlp_call(self, h):
        """norm_qgemv_swiglu's arguments; the first three are rms_norm's, h and the rest
        qgemv_swiglu's (the split form)."""
        norm, mlp = self["post_attention_layernorm"], self.mlp_module
        return ((h, norm["weight"], norm.eps, *_packed(mlp.gate_proj), *_packed(mlp.up_proj)),
                {"group_size": mlp.gate_proj.group_size, "bits": 4})

    def _head_norm_call(self, q, k, offset):
        """qk_norm_rope's arguments (Qwen3's q_norm and k_norm, then RoPE)."""
        a = self["self_attn"]
        return (q, k, a.q_norm["weight"], a.k_norm["weight"], a.q_norm.eps, self._freqs, offset,
                self._head_dim()), {}

    def _qkv_fused(self, x, offset):
        """Decode only (one token): the fused norm, q/k/v projections and RoPE, q/k/v made
        (1, heads, 1, head_dim) by the kernel itself (no view nodes). With head norms (Qwen3)
        the projections come unrotated (offset 0 turns nothing: cos 1, sin 0, exactly) and
        qk_norm_rope norms and rotates them."""
        head_norms = self.has_head_norms()
        args, kw = self._qkv_call(x, self._zero if head_norms else offset)
        q, k, v = tuned.norm_qkv_rope.no_grad(*args, **kw)
        if head_norms:
            args, kw = self._head_norm_call(q, k, offset)
            q, k = tuned.qk_norm_rope.no_grad(*args, **kw)
        return q, k, v

    def _out_fused(self, x, o):
        """Decode only: o projection + residual, norm + gate + up + SwiGLU, down + residual.
        No view nodes: qgemv_add reads attention's (1, heads, 1, head_dim) output as the row
        it is in memory, and the activations keep x's (1, 1, dims) shape throughout."""
        args, kw = self._add_call(self["self_attn"].o_proj, o, x)
        h = tuned.qgemv_add.no_grad(*args, **kw)
        args, kw = self._mlp_call(h)
        if self._mlp_fused:
            y = tuned.norm_qgemv_swiglu.no_grad(*args, **kw)
        else:  # the norm alone is cheaper than the fused prologue where the store says so
            y = tuned.qgemv_swiglu.no_grad(tuned.rms_norm.no_grad(*args[:3]), *args[3:], **kw)
        args, kw = self._add_call(self.mlp_module.down_proj, y, h)
        return tuned.qgemv_add.no_grad(*args, **kw)

    def _fused_steps_that_pay(self, x) -> tuple[bool, bool, bool]:
        """(pre, post, mlp): whether each half of the decode step runs its fused ops, and
        whether the post half's MLP is norm_qgemv_swiglu (else rms_norm, then qgemv_swiglu).
        A half whose layers the fused ops do not take (why_not_fused_pre/post) runs unfused.
        A fused op no stored variant serves would run its built-in composition, the launches
        of the unfused half without that half's separately tuned kernels: then the unfused
        half runs. The MLP takes whichever form the store says costs a program less (chain
        latency + host time of each call); the fused form when that is unknown.
        With fused="always" all run fused (tests: the compositions on a CPU)."""
        can_pre, can_post = self.why_not_fused_pre() is None, self.why_not_fused_post() is None
        if x.shape[0] != 1:
            return False, False, False  # several sequences at once: the fused kernels take one token
        if self._fused == "always":
            return can_pre, can_post, can_post
        pre = False
        if can_pre:
            args, kw = self._qkv_call(x, offset_array(0))
            pre = runtime.serves("norm_qkv_rope", *args, **kw)
            if self.has_head_norms():
                # asked (so `hlh_mlx tune` sweeps it), but not a condition: with only
                # norm_qkv_rope tuned, its built-in (two norms, two ropes) still leaves the
                # half fewer launches than unfused
                d, a = self._head_dim(), self["self_attn"]
                q1, k1 = (mx.zeros((1, n // d, 1, d), x.dtype) for n in (a.q_proj.weight.shape[0],
                                                                      a.k_proj.weight.shape[0]))
                runtime.serves("qk_norm_rope", *self._head_norm_call(q1, k1, offset_array(0))[0])
        if not can_post:
            return pre, False, False
        o, dn = self["self_attn"].o_proj, self.mlp_module.down_proj
        # the post half's calls at the shapes it makes them (x's leading dims; bind reads shapes
        # and dtypes only)
        lead = x.shape[:-1]
        heads = self._heads[0]  # attention's output: o_proj's inputs as (1, heads, 1, head_dim)
        o1 = mx.zeros((1, heads, 1, o["weight"].shape[1] * 32 // o.bits // heads), x.dtype)
        h1 = mx.zeros(lead + (dn["weight"].shape[0],), x.dtype)
        y1 = mx.zeros(lead + (dn["weight"].shape[1] * 8,), x.dtype)
        # every call asked (no short cut): each asked call is recorded, so `hlh_mlx tune` sweeps it
        post = all([runtime.serves("qgemv_add", *a, **k) for a, k in (self._add_call(o, o1, x),
                                                                      self._add_call(dn, y1, h1))])
        args, kw = self._mlp_call(h1)
        fused = runtime.expected_us("norm_qgemv_swiglu", *args, **kw)
        parts = [runtime.expected_us("rms_norm", *args[:3]), runtime.expected_us("qgemv_swiglu", h1, *args[3:], **kw)]
        split_known = fused is not None and None not in parts
        mlp_fused = runtime.serves("norm_qgemv_swiglu", *args, **kw) and not (split_known and sum(parts) < fused)
        return pre, post, mlp_fused

    def _moe_that_pays(self, x) -> bool:
        """Whether the decode step runs a MoE MLP's routing and experts through hlh_mlx.moe's
        fused ops: one token of one sequence, an MLP `moe.decode` reproduces, and a stored
        variant serving at least one of the three ops (the others then run their built-in
        compositions, mlx-lm's ops; with fused="always" wherever the MLP is one: tests on a CPU)."""
        if not self._fused or x.shape[0] != 1 or moe.why_not(self.mlp_module) is not None:
            return False
        return self._fused == "always" or moe.serves(self.mlp_module, x)

    def _steps(self, x):
        # what the halves were chosen for: the children, the batch (the fused ops take one
        # token of one sequence) and the dtype (the store's figures are per dtype)
        key = (self._children_key(), x.shape[0], x.dtype)
        c = self._compiled
        if c is None or c[0] != key:
            a = self["self_attn"]
            pre_reads = [self["input_layernorm"]] + [m for k, m in a.children().items()
                                                     if k != "o_proj" and isinstance(m, nn.Module)]
            post_reads = [a.o_proj, self["post_attention_layernorm"], self.mlp_module]
            pre, post = self._qkv, self._out
            if self.why_not_fused_pre() is None:
                freqs = rope_freqs(a.rope, self._head_dim())
                # constants of the trace: unevaluated, their graphs would run every step. The
                # zero offset is a view into device memory (as every offset the kernels read)
                # of its own: offset_array(0) is the step's offset at position 0, which MLX
                # refuses as both an input of the trace and a constant in it
                zero = offset_input(0)
                mx.eval(freqs, zero)
                object.__setattr__(self, "_freqs", freqs)
                object.__setattr__(self, "_zero", zero)
            fused_pre, fused_post, mlp_fused = self._fused_steps_that_pay(x)
            if self.mlp_form is not None:  # set by hand (an A/B measurement): not the store's pick
                mlp_fused = self.mlp_form == "fused"
            object.__setattr__(self, "_mlp_fused", mlp_fused)
            pre = self._qkv_fused if fused_pre else pre
            post = self._out_fused if fused_post else post
            # an MLP the fused post half does not take may be experts the MoE ops take
            object.__setattr__(self, "_moe_fused", self.why_not_fused_post() is not None and self._moe_that_pays(x))
            c = (key, _Compiled(pre_reads, pre), _Compiled(post_reads, post))
            object.__setattr__(self, "_compiled", c)
        return c[1], c[2]

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        from mlx_lm.models.base import scaled_dot_product_attention
        offset = cache.offset if cache is not None else 0
        if x.shape[1] == 1 and not self.training:
            qkv, out = self._steps(x)
            # data, so one trace serves every step: (1,) as the fused kernel takes it, 0-d
            # where MLX's rope rotates several sequences (its CUDA kernel reads a (1,) offset
            # per sequence; the fused ops take one sequence)
            if not isinstance(offset, mx.array):  # a batch cache's offsets (B,) are data already
                offset = offset_array(offset) if x.shape[0] == 1 else offset_scalar(offset)
        else:  # prefill and training: shapes vary, the host cost is small beside the work
            qkv, out = self._qkv, self._out
        q, k, v = qkv(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self["self_attn"].scale, mask=mask)
        return out(x, o)


def _why_not_4bit(projs: list, biases: bool = False) -> str | None:
    """None when every projection is 4-bit affine in one of the fused kernels' group sizes,
    all in one format (and without a bias, unless `biases`), else why not."""
    if not all(isinstance(p, nn.QuantizedLinear) for p in projs):
        return "not every projection is quantized"
    if not biases and any("bias" in p for p in projs):
        return "projections with a bias"
    formats = {(p.bits, p.group_size, getattr(p, "mode", "affine")) for p in projs}
    if len(formats) != 1:
        return f"projections quantized in different formats (bits, group, mode: {sorted(formats)})"
    if next(iter(formats)) not in {(4, g, "affine") for g in QUANT_GROUPS}:
        return f"weights are not 4-bit affine with group size {' or '.join(map(str, QUANT_GROUPS))} " \
               f"({next(iter(formats))})"
    return None


def _packed(proj) -> tuple:
    """A 4-bit QuantizedLinear's weight, scales and biases, as the fused ops take them."""
    return proj["weight"], proj["scales"], proj["biases"]


def rope_freqs(rope, head_dim: int) -> mx.array | None:
    """mx.fast.rope's `freqs` for a RoPE module (angle_i = position / freqs[i]: its base and
    scale folded in), or None where the fused kernel does not serve it: traditional pairs,
    a partial rotation, scalings other than a base (mlx.nn.RoPE) or Llama 3's table."""
    if getattr(rope, "traditional", True) or getattr(rope, "dims", None) != head_dim or head_dim % 2:
        return None
    half = head_dim // 2
    if isinstance(rope, nn.RoPE):  # angle = position * scale * base ** (-i / half), as MLX computes it
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(rope.base) / half)) * rope.scale
        return mx.reciprocal(inv)
    freqs = getattr(rope, "_freqs", None)
    if type(rope).__name__ == "Llama3RoPE" and isinstance(freqs, mx.array) and freqs.shape == (half,):
        return freqs.astype(mx.float32)  # mlx-lm calls mx.fast.rope with these and scale 1.0
    return None


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
