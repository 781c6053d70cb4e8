"""The routing and routed experts of mlx-lm's MoE blocks at decode, as three fused ops.

mlx-lm's Qwen2-MoE, Qwen3-MoE and Mixtral blocks run one token's experts as a router (a
gate projection, softmax and top-k; Mixtral: top-k of the logits, softmax over those), SwitchGLU (two gather_qmm, SwiGLU, a third gather_qmm) and a
weighted sum over the chosen experts: ~30 graph nodes a block, each paid for by the host
while the GPU work is a few microseconds. `decode(mlp, x)` computes what `mlp(x)` does for
one token as

    inds, scores = moe_route(gate(x), k)             # softmax, top-k, gather (and renormalise):
                                                     #   5-7 nodes -> 1 (Mixtral's order: mlx-lm's
                                                     #   own ops, no kernel takes it yet)
    y = moe_qgemv_swiglu(x, inds, gate, up)          # two gathers, SwiGLU: 4 launches -> 1
    out = moe_qgemv_combine(y, inds, scores, down)   # gather, multiply, sum: 3 -> 1

each a tuned kernel where a stored variant serves it (else the same built-in composition:
mlx-lm's routing code, op for op, so the same experts in the same order).
A shared expert (Qwen2-MoE) runs as the block has it (`patch` makes it an hlh_mlx.nn.SwiGLU,
whose gate, up and SwiGLU are one qgemv_swiglu call at decode).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import runtime, tuned
from .ops.moe_route import ORDERS, moe_route
from .ops.spec import QUANT_GROUPS

# mlx-lm's block classes whose routing hlh_mlx.ops.moe_route reproduces (mlx-lm 0.32), as
# the op's `order` and whether the block renormalises the chosen weights
ROUTERS = {"Qwen2MoeSparseMoeBlock": lambda mlp: ("qwen2", False),
           "Qwen3MoeSparseMoeBlock": lambda mlp: ("qwen3", bool(mlp.norm_topk_prob)),
           "MixtralSparseMoeBlock": lambda mlp: ("mixtral", False)}


def kernel_order_missing(mlp) -> str | None:
    """The block's routing order where no moe_route kernel takes it (its routing then runs
    mlx-lm's own ops at every call), else None."""
    order = ROUTERS[type(mlp).__name__](mlp)[0]
    return None if order in ORDERS else order


def top_k(mlp) -> int:
    """How many experts the block runs per token (Mixtral names it num_experts_per_tok)."""
    return mlp.top_k if hasattr(mlp, "top_k") else mlp.num_experts_per_tok


def _route_call(mlp, logits):
    order, norm = ROUTERS[type(mlp).__name__](mlp)
    return (logits, top_k(mlp)), {"order": order, "norm": norm}


def route(mlp, x):
    """(indices, scores) of the experts `mlp` picks for x, as the block computes them: its gate
    projection, then softmax and top-k as one tuned call (moe_route) where a variant serves
    it, else mlx-lm's own ops."""
    args, kw = _route_call(mlp, mlp.gate(x))
    if kernel_order_missing(mlp):  # no kernel takes it: mlx-lm's ops, not a fallback every step
        return moe_route(*args, **kw)
    return tuned.moe_route.no_grad(*args, **kw)


def why_not(mlp) -> str | None:
    """None when `decode` reproduces this MLP, else why not."""
    name = type(mlp).__name__
    if name not in ROUTERS:
        return f"{name} is not an MoE block whose routing is known ({', '.join(ROUTERS)})"
    if getattr(mlp, "sharding_group", None) is not None:
        return "experts sharded over several devices"
    sw = mlp.get("switch_mlp") if isinstance(mlp, nn.Module) else None
    projs = [sw.get(k) if isinstance(sw, nn.Module) else None for k in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p).__name__ == "QuantizedSwitchLinear" for p in projs):
        return "the experts are not quantized (QuantizedSwitchLinear)"
    if any("bias" in p or p.get("biases") is None or getattr(p, "global_scale", None) is not None for p in projs):
        return "expert projections with a bias, or not in affine mode"
    formats = {(p.bits, p.group_size, p.mode) for p in projs}
    if len(formats) != 1 or next(iter(formats)) not in {(4, g, "affine") for g in QUANT_GROUPS}:
        return f"experts are not 4-bit affine with group size {' or '.join(map(str, QUANT_GROUPS))} " \
               f"({sorted(formats)})"
    if type(getattr(sw, "activation", None)).__name__ != "SwiGLU":
        return "the experts' activation is not SwiGLU"
    return None


def _packed(proj) -> tuple:
    return proj["weight"], proj["scales"], proj["biases"]


# The fused ops' calls as (args, kwargs): what `decode` runs and what `serves` asks about
# must be the same calls.
def _up_call(mlp, x, inds):
    sw = mlp.switch_mlp
    return (x, inds, *_packed(sw.gate_proj), *_packed(sw.up_proj)), {"group_size": sw.gate_proj.group_size, "bits": 4}


def _down_call(mlp, y, inds, scores):
    sw = mlp.switch_mlp
    return (y, inds, scores, *_packed(sw.down_proj)), {"group_size": sw.down_proj.group_size, "bits": 4}


def serves(mlp, x) -> bool:
    """Whether stored variants serve any of the three fused ops for one token `x` (1, 1, dims)
    of this MLP (each that does not runs its built-in composition, mlx-lm's own ops; bind
    reads shapes and dtypes only: zeros stand in for the activations). All are asked (no
    short cut): each asked call is recorded, so `hlh_mlx tune` sweeps it."""
    logits = mx.zeros((*x.shape[:-1], mlp.num_experts), x.dtype)
    inds = mx.zeros((*x.shape[:-1], top_k(mlp)), mx.uint32)
    y = mx.zeros((*inds.shape, mlp.switch_mlp.gate_proj.output_dims), x.dtype)
    calls = [("moe_qgemv_swiglu", _up_call(mlp, x, inds)),
             ("moe_qgemv_combine", _down_call(mlp, y, inds, mx.zeros(inds.shape, mx.float32)))]  # moe_route's scores
    if not kernel_order_missing(mlp):
        calls.insert(0, ("moe_route", _route_call(mlp, logits)))
    return any([runtime.serves(op, *args, **kw) for op, (args, kw) in calls])


def decode(mlp, x):
    """`mlp(x)` for one token x (1, 1, dims) through the fused expert ops (module docstring)."""
    inds, scores = route(mlp, x)
    args, kw = _up_call(mlp, x, inds)
    y = tuned.moe_qgemv_swiglu.no_grad(*args, **kw)
    args, kw = _down_call(mlp, y, inds, scores)
    out = tuned.moe_qgemv_combine.no_grad(*args, **kw)
    if "shared_expert" in mlp:
        out = out + mx.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
    return out
