"""`hlh_mlx.patch(model)`: swap layers of an mlx.nn.Module for tuned drop-ins.

Replaced, each only after it is shown to compute the same thing:
- decoder blocks of mlx-lm's layout (input_layernorm, self_attn with q/k/v/o projections
  and rope, post_attention_layernorm, mlp) in quantized models -> hlh_mlx.blocks.DecoderBlock
  (a compiled decode step through fused decoder ops where tuned kernels serve them, see
  hlh_mlx.blocks), checked at a prefill and at decode steps through a KV cache;
- mlx.nn.RMSNorm, LayerNorm, RoPE, Linear and QuantizedLinear -> hlh_mlx.nn's, and MLPs
  with gate_proj, up_proj and down_proj linear layers -> hlh_mlx.nn.SwiGLU (one 4-bit launch
  for gate, up and SwiGLU at one token), checked on a random input; a block's children are
  patched too.
Everything else stays, and the report says what stayed and why (expert MLPs, blocks whose
check fails or raises, unquantized blocks' compiled step) and, per block, whether its decode
step can run the fused ops and if not why. The model's train/eval mode is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as base_nn
import numpy as np

from . import blocks, moe, nn, ops, tuned
from .ops.spec import QUANT_GROUPS


@dataclass
class PatchReport:
    replaced: list = field(default_factory=list)   # (path, old class, new class)
    kept: list = field(default_factory=list)       # (path, class, reason)
    notes: list = field(default_factory=list)      # (path, what a replaced layer runs)
    # (container, key, old, new) in the order made: what `unpatched()` takes back and redoes
    swaps: list = field(default_factory=list, repr=False, compare=False)

    def swap(self, parent, key, new) -> None:
        """parent[key] = new, remembered so that `unpatched()` can put the old one back."""
        self.swaps.append((parent, key, parent[key], new))
        parent[key] = new

    @contextmanager
    def unpatched(self):
        """The model as it was before `patch` for the duration (the same objects: their
        compiled steps and caches stay warm), patched again after. A benchmark alternates
        the two sides with this, so that drift of the machine falls on both alike."""
        for parent, key, old, _ in reversed(self.swaps):
            parent[key] = old
        try:
            yield
        finally:
            for parent, key, _, new in self.swaps:
                parent[key] = new

    def as_dict(self) -> dict:
        return {"replaced": [{"path": p, "from": a, "to": b} for p, a, b in self.replaced],
                "kept": [{"path": p, "class": c, "reason": why} for p, c, why in self.kept],
                "notes": [{"path": p, "note": n} for p, n in self.notes]}

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} layer(s), kept {len(self.kept)}"]
        lines += [f"  {p}: {a} -> {b}" for p, a, b in self.replaced]
        lines += [f"  kept {p} ({c}): {why}" for p, c, why in self.kept]
        lines += [f"  {p}: {n}" for p, n in self.notes]
        return "\n".join(lines)


def _dtype_of(module) -> mx.Dtype:
    """The activations' dtype: of the first floating-point parameter (quantized weights are uint32)."""
    return next((v.dtype for _, v in base_nn.utils.tree_flatten(module.parameters())
                 if mx.issubdtype(v.dtype, mx.floating)), mx.float32)


def _differs(old, new, dims: int) -> str | None:
    """None when `new` computes what `old` does on a random input, else why not (a check
    that raises counts as a difference: the layer is kept and the error reported)."""
    x = mx.array(np.random.default_rng(0).standard_normal((2, 3, dims)).astype(np.float32))
    x = x.astype(_dtype_of(old))
    try:
        with tuned.lenient():
            a, b = old(x).astype(mx.float32), new(x).astype(mx.float32)
        mx.eval(a, b)
    except Exception as e:  # whatever the layer raises: report it, keep the layer
        return f"the numeric check raised {type(e).__name__}: {e}"
    tol = 1e-4 if x.dtype == mx.float32 else 2e-2
    if a.shape != b.shape:
        return f"output shape {b.shape} instead of {a.shape}"
    if not bool(mx.allclose(a, b, rtol=tol, atol=tol)):
        err = float(mx.max(mx.abs(a - b)))
        return f"differs on a random input (max abs error {err:.3g}, tolerance {tol})"
    return None


_LINEAR = (base_nn.Linear, base_nn.QuantizedLinear)
FUSABLE = "decode step fusable (each half runs its fused ops where a tuned kernel serves them)"
MOE_FUSABLE = ("decode step's routing and routed experts fusable (moe_route, moe_qgemv_swiglu and "
               "moe_qgemv_combine, each where a tuned kernel serves it; the residual add and norm as add_rms_norm)")
MOE_EXPERTS_FUSABLE = ("decode step's routed experts fusable (moe_qgemv_swiglu and moe_qgemv_combine, each where "
                       "a tuned kernel serves it; the residual add and norm as add_rms_norm); its routing runs "
                       "mlx-lm's ops ({order} order: no moe_route kernel takes it)")


def _replacement(module):
    """(new module, None) or (None, reason) or (None, None) when not a candidate."""
    if isinstance(module, base_nn.Module) and not isinstance(module, blocks.DecoderBlock) \
            and blocks.why_not(module) is None:
        if not blocks.quantized(module):
            # its layers are still patched one by one (below); only the compiled step is not used
            return None, ("decoder block kept as it is (its layers are patched): not quantized, so its decode "
                          "step is bound by weight reads, where a compiled step measured slower, not faster")
        new = blocks.DecoderBlock(module, fused="add_rms_norm" in ops.names())
        why = blocks.differs(module, new, module["post_attention_layernorm"]["weight"].shape[0], _dtype_of(module))
        return (new, None) if why is None else (None, f"decoder block kept: {why}")
    if type(module) is base_nn.RoPE:
        new = nn.RoPE(module.dims, traditional=module.traditional, base=module.base, scale=module.scale)
        why = _differs(module, new, module.dims)
        return (new, None) if why is None else (None, f"the tuned RoPE: {why}")
    if type(module) is base_nn.Linear:
        out_dims, in_dims = module.weight.shape
        new = nn.Linear(in_dims, out_dims, bias="bias" in module)
        new.update(module.parameters())
        return new, None
    if type(module) is base_nn.QuantizedLinear:
        if getattr(module, "mode", "affine") != "affine" or module.bits != 4 or module.group_size not in QUANT_GROUPS:
            return None, (f"only 4-bit affine weights with group size {' or '.join(map(str, QUANT_GROUPS))} "
                          "have a tuned kernel")
        return nn.QuantizedLinear.from_layer(module), None
    if type(module) is base_nn.RMSNorm:
        new = nn.RMSNorm(module.weight.shape[0], eps=module.eps)
        new.weight = module.weight
        return new, None
    if type(module) is base_nn.LayerNorm:
        new = nn.LayerNorm(module.dims, eps=module.eps, affine="weight" in module, bias="bias" in module)
        new.update(module.parameters())
        return new, None
    kids = module.children() if isinstance(module, base_nn.Module) else {}
    projections = [kids.get(k) for k in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(p, base_nn.Module) for p in projections) and not all(isinstance(p, _LINEAR) for p in projections):
        kinds = ", ".join(sorted({type(p).__name__ for p in projections}))
        return None, (f"a gated MLP whose projections are {kinds} (expert weights selected per token): kept; "
                      "a patched decoder block runs one token's experts as fused ops where its MoE block "
                      "is one hlh_mlx.moe knows")
    if (all(isinstance(kids.get(k), _LINEAR) for k in ("gate_proj", "up_proj", "down_proj"))
            and not isinstance(module, nn.SwiGLU)):
        new = nn.SwiGLU.from_layers(module.gate_proj, module.up_proj, module.down_proj)
        dims = module.gate_proj.weight.shape[1] * (32 // getattr(module.gate_proj, "bits", 32))
        why = _differs(module, new, dims)
        if why is None:
            return new, None
        return None, f"has gate/up/down projections but is not down(silu(gate(x)) * up(x)): {why}"
    return None, None


def _fusion_note(block) -> str:
    """What of a patched block's decode step can run as fused ops, and why the rest cannot."""
    pre, post = block.why_not_fused_pre(), block.why_not_fused_post()
    if pre is None and post is None:
        return FUSABLE
    if moe.why_not(block.mlp_module) is None:
        pre_ops = "norm_qkv_rope, qk_norm_rope" if block.has_head_norms() else "norm_qkv_rope"
        order = moe.kernel_order_missing(block.mlp_module)
        note = MOE_EXPERTS_FUSABLE.format(order=order) if order else MOE_FUSABLE
        return note + (f"; the attention input ({pre_ops}) too" if pre is None else f"; not the attention input ({pre})")
    if pre is None:
        return f"decode step partly fused (the attention input fuses; not the MLP half: {post})"
    if post is None:
        return f"decode step partly fused (the MLP half fuses; not the attention input: {pre})"
    return f"decode step partly fused ({pre if pre == post else f'attention input: {pre}; MLP half: {post}'})"


def patch(model: base_nn.Module) -> PatchReport:
    """Swap matching layers in place; return what was replaced and what was kept."""
    report = PatchReport()

    def visit(parent, key, module, path):
        new, reason = _replacement(module)
        if new is not None:
            new.train(module.training)  # a new Module starts in training mode: keep the model's
            report.swap(parent, key, new)
            report.replaced.append((path, type(module).__name__, f"hlh_mlx.nn.{type(new).__name__}"))
            walk(new, path)  # a SwiGLU's projections are layers of their own
            if isinstance(new, blocks.DecoderBlock):
                report.notes.append((path, _fusion_note(new)))
            return
        if reason:
            report.kept.append((path, type(module).__name__, reason))
        walk(module, path)

    def walk(module, prefix):
        for name, child in module.children().items():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, list):
                items = module[name]  # the module's own list: children() returns a filtered copy
                for i, c in enumerate(items):
                    if isinstance(c, base_nn.Module):
                        visit(items, i, c, f"{path}.{i}")
            elif isinstance(child, base_nn.Module):
                visit(module, name, child, path)

    walk(model, "")
    for m in model.modules():
        if isinstance(m, blocks.DecoderBlock):
            m.reset()  # traced with the children it had when checked
    return report
