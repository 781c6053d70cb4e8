"""The routed experts of mlx-lm's MoE blocks at decode, as two fused ops.

mlx-lm's Qwen2-MoE and Qwen3-MoE blocks run one token's experts as a router (a gate
projection, softmax, top-k), SwitchGLU (two gather_qmm, SwiGLU, a third gather_qmm) and a
weighted sum over the chosen experts: ~30 graph nodes a block, each paid for by the host
while the GPU work is a few microseconds. `decode(mlp, x)` computes what `mlp(x)` does for
one token with the router as the family writes it (the same built-in ops, so the same
experts in the same order) and the experts as

    y = moe_qgemv_swiglu(x, inds, gate, up)          # two gathers, SwiGLU: 4 launches -> 1
    out = moe_qgemv_combine(y, inds, scores, down)   # gather, multiply, sum: 3 -> 1

each a tuned kernel where a stored variant serves it (else the same built-in composition).
A shared expert (Qwen2-MoE) runs as the block has it (`patch` makes it an hlh_mlx.nn.SwiGLU,
whose gate, up and SwiGLU are one qgemv_swiglu call at decode).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import runtime, tuned

_GROUPS = (64, 128)


def _route_qwen2(mlp, x):
    gates = mx.softmax(mlp.gate(x), axis=-1, precise=True)
    k = mlp.top_k
    inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    return inds, mx.take_along_axis(gates, inds, axis=-1)


def _route_qwen3(mlp, x):
    gates = mx.softmax(mlp.gate(x), axis=-1, precise=True)
    k = mlp.top_k
    inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if mlp.norm_topk_prob:
        scores /= mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


# mlx-lm's block classes whose routing is copied here, op for op (mlx-lm 0.32): the same
# experts in the same order as the block picks them
ROUTERS = {"Qwen2MoeSparseMoeBlock": _route_qwen2, "Qwen3MoeSparseMoeBlock": _route_qwen3}


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
    if len(formats) != 1 or next(iter(formats)) not in {(4, g, "affine") for g in _GROUPS}:
        return f"experts are not 4-bit affine with group size 64 or 128 ({sorted(formats)})"
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
    """Whether stored variants serve both fused ops for one token `x` (1, 1, dims) of this
    MLP (bind reads shapes and dtypes only: zeros stand in for the router's outputs). Both
    are asked (no short cut): each asked call is recorded, so `hlh_mlx tune` sweeps it."""
    inds = mx.zeros((*x.shape[:-1], mlp.top_k), mx.uint32)
    y = mx.zeros((*inds.shape, mlp.switch_mlp.gate_proj.output_dims), x.dtype)
    calls = [("moe_qgemv_swiglu", _up_call(mlp, x, inds)),
             ("moe_qgemv_combine", _down_call(mlp, y, inds, mx.zeros(inds.shape, x.dtype)))]
    return all([runtime.serves(op, *args, **kw) for op, (args, kw) in calls])


def decode(mlp, x):
    """`mlp(x)` for one token x (1, 1, dims) through the fused expert ops (module docstring)."""
    inds, scores = ROUTERS[type(mlp).__name__](mlp, x)
    args, kw = _up_call(mlp, x, inds)
    y = tuned.moe_qgemv_swiglu.no_grad(*args, **kw)
    args, kw = _down_call(mlp, y, inds, scores)
    out = tuned.moe_qgemv_combine.no_grad(*args, **kw)
    if "shared_expert" in mlp:
        out = out + mx.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
    return out
