"""moe_route: an MoE block's top-k gating for one token, from its router's logits (1, E):
g = softmax(logits) (in float32, rounded to the dtype, as mx.softmax(precise=True) gives it),
the S experts with the largest g, and their weights g[e] (optionally renormalised to sum to
1). Outputs: indices (S,) uint32 and scores (S,) float32 holding the logits' dtype's values
(mlx-lm's, widened: the next kernel reads them from device memory, where S scores of 2 bytes
can be 8 bytes, which MLX's CUDA allocator keeps in managed host memory). Built-in: mlx-lm's
routing code, five to seven graph nodes (softmax, negate, argpartition, slice,
take_along_axis, and sum and divide when renormalised).

Which experts, in which order, as MLX's CUDA back end gives them (its argpartition is a
stable sort; on the CPU it is not, so ties there may differ):
  ORDER=0 (Qwen2-MoE: argpartition(-g, kth=S-1)[:S]): largest first, among equal weights
    the lower expert first (and chosen first at the boundary);
  ORDER=1 (Qwen3-MoE: argpartition(g, kth=-S)[-S:]): the S last of g sorted ascending
    (stable): smallest of them first, and among equal weights at the boundary the higher
    experts chosen.
Mixtral's routing (the top S of the logits, ranked as ORDER=0 ranks, then softmax over
those S alone) is moe_route's order="mixtral": its built-in composition, no kernel yet.
NORM=1 (Qwen3-MoE's norm_topk_prob): scores = g[e] / sum (the sum of the S weights in float32,
rounded to the dtype; the quotient rounded once), as `scores /= scores.sum()` in the dtype."""

import mlx.core as mx
import numpy as np

from .spec import DTYPES, ROUNDED_ONCE, Call, OpSpec, constant, dtype_name, input_constant

ORDERS = {"qwen2": 0, "qwen3": 1}  # the kernels' ORDER
ROUTINGS = (*ORDERS, "mixtral")     # what `moe_route` computes (the built-in)


def _inputs(s, dtype, rng):
    """Router logits as a trained router spreads them (std 2), with a tie at the boundary
    between the S-th and (S+1)-th largest weights, placed so the tie rule picks the expert a
    wrong rule would not: an exact tie of the logits for even E, and for odd E (half dtypes)
    two logits one step apart whose weights differ in float32 but round to the same value,
    so a kernel that ranks before rounding fails too. `route` carries S, ORDER and NORM for
    the reference (the kernels take them as template arguments)."""
    e, k = s["E"], s["S"]
    logits = (rng.standard_normal(e) * 2.0).astype(np.float32)
    if e > k:
        ranked = np.argsort(-logits, kind="stable")
        lo, hi = sorted(ranked[k - 1: k + 1])
        # ORDER 0 keeps the lower expert at a tie, ORDER 1 the higher: `b` is the one kept
        a, b = (hi, lo) if s["ORDER"] == 0 else (lo, hi)
        logits[b] = logits[a]
        if e % 2 and dtype != mx.float32:
            logits -= logits[a] - 0.03  # near 0 a logit's step is far below a weight's
            logits[b] = _rounding_tie(logits, a, b, dtype)
    return [mx.array(logits[None]).astype(dtype), input_constant([k, s["ORDER"], s["NORM"]], mx.int32)]


def _rounding_tie(logits, a, b, dtype):
    """A value for logits[b] just below logits[a] in `dtype` whose softmax weight differs from
    a's in float32 and equals it rounded to `dtype` (else logits[a]: an exact tie)."""
    x = logits.copy()
    for steps in range(1, 9):
        below = mx.array(np.float32(logits[a])).astype(dtype).astype(mx.float32)
        for _ in range(steps):  # the dtype's next value down, `steps` times
            below = _next_down(below, dtype)
        x[b] = below.item()
        g = mx.softmax(mx.array(x).astype(dtype).astype(mx.float32))
        ga, gb = g[a].item(), g[b].item()
        if ga != gb and mx.array(ga).astype(dtype).item() == mx.array(gb).astype(dtype).item():
            return x[b]
    return logits[a]


def _next_down(v, dtype):
    """The largest `dtype` value below v (a float32 array holding a `dtype` value)."""
    bits = {mx.float16: (mx.uint16, 16), mx.bfloat16: (mx.uint16, 16)}[dtype]
    h = v.astype(dtype).view(bits[0])
    h = h + 1 if v.item() < 0 else h - 1  # magnitude up for negatives, down for positives
    return h.view(dtype).astype(mx.float32)


def _reference(logits, route):
    k, order, norm = route.tolist()[:3]
    g = mx.softmax(logits.astype(mx.float32), axis=-1).astype(logits.dtype)
    # a stable sort on every back end (MLX's CUDA argpartition is one; its CPU one is not)
    key = np.asarray((-g if order == 0 else g).astype(mx.float32)).reshape(-1)
    idx = np.argsort(key, kind="stable")
    idx = idx[:k] if order == 0 else idx[-k:]
    scores = g.reshape(-1)[mx.array(idx.astype(np.int32))]
    if norm:
        total = scores.astype(mx.float32).sum().astype(g.dtype)
        scores = (scores.astype(mx.float32) / total.astype(mx.float32)).astype(g.dtype)
    return [mx.array(idx.astype(np.uint32)), scores.astype(mx.float32)]


def moe_route(logits, k, order="qwen2", norm=False):
    """(indices, scores) of the top `k` experts for router `logits`, as mlx-lm's Qwen2-MoE
    (order="qwen2"), Qwen3-MoE (order="qwen3", norm=norm_topk_prob) or Mixtral
    (order="mixtral": the top k logits, then softmax over them) blocks compute them;
    the scores in float32, holding mlx-lm's values (in the logits' dtype) exactly: 4 bytes a
    score keep S >= 3 of them out of the managed pool MLX's CUDA allocator keeps arrays of 8
    bytes or fewer in (read across the bus by whichever kernel reads them next)."""
    if order not in ROUTINGS:
        raise ValueError(f"[moe_route] order must be one of {', '.join(ROUTINGS)}, not {order!r}")
    if order == "mixtral":  # mlx-lm's MixtralSparseMoeBlock, op for op
        if norm:
            raise ValueError("[moe_route] Mixtral's scores are a softmax over the chosen experts already (norm=False)")
        inds = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        scores = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
        return inds, scores.astype(mx.float32)
    gates = mx.softmax(logits, axis=-1, precise=True)
    if order == "qwen2":
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    else:
        inds = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if norm:
        scores /= mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores.astype(mx.float32)


def _builtin(logits, route):
    k, order, norm = route.tolist()[:3]
    return [a.reshape(-1) for a in moe_route(logits, k, "qwen2" if order == 0 else "qwen3", bool(norm))]


def _builtin_for(s):
    order = "qwen2" if s["ORDER"] == 0 else "qwen3"
    return lambda logits, route: [a.reshape(-1) for a in moe_route(logits, s["S"], order, bool(s["NORM"]))]


def bind(logits, k, order="qwen2", norm=False):
    if order not in ORDERS:
        return f"order {order!r} is not one the kernels take ({', '.join(ORDERS)})"
    if norm and order != "qwen3":
        return "renormalised scores come with Qwen3's order (order='qwen3')"
    if logits.dtype not in DTYPES.values():
        return f"logits' dtype {logits.dtype} has no tuned kernels"
    e = logits.shape[-1]
    if logits.size != e:
        return f"one token only ({logits.size // max(e, 1)} rows given)"
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
        return f"k must be an int from 1 to the {e} experts (got {k!r})"
    if e > 1024 or k > 64:
        return f"{e} experts, {k} chosen: the kernels take up to 1024 and 64"
    shape = {"E": e, "S": k, "ORDER": ORDERS[order], "NORM": int(bool(norm))}
    lead = logits.shape[:-1]
    return Call([logits, constant([k, shape["ORDER"], shape["NORM"]], mx.int32)], shape, dtype_name(logits.dtype),
                [(*lead, k), (*lead, k)], finish=lambda outs: (outs[0], outs[1]))


OP = OpSpec(
    name="moe_route",
    dims=("E", "S", "ORDER", "NORM"),
    flags=("ORDER", "NORM"),
    make_inputs=_inputs,
    reference=_reference,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(s["S"],), (s["S"],)],
    output_dtypes=lambda dtype: [mx.uint32, mx.float32],
    tolerance=ROUNDED_ONCE,
    bytes=lambda s, size: s["E"] * size + s["S"] * 8,
    flops=lambda s: 6 * s["E"] + s["E"] * s["E"],
    # Qwen1.5-MoE-A2.7B (4 of 60), Qwen3-30B-A3B (8 of 128, renormalised)
    shapes=[{"E": 60, "S": 4, "ORDER": 0, "NORM": 0}, {"E": 128, "S": 8, "ORDER": 1, "NORM": 1}],
    emulator_shapes=[{"E": 60, "S": 4, "ORDER": 0, "NORM": 0}, {"E": 37, "S": 5, "ORDER": 1, "NORM": 1},
                     {"E": 16, "S": 3, "ORDER": 1, "NORM": 0}],
    # one expert; more experts than threads in a block; every expert chosen; a small spread
    edge_shapes=[{"E": 1, "S": 1, "ORDER": 0, "NORM": 0}, {"E": 300, "S": 8, "ORDER": 1, "NORM": 1},
                 {"E": 8, "S": 8, "ORDER": 0, "NORM": 0}, {"E": 129, "S": 8, "ORDER": 0, "NORM": 0}],
    bind=bind,
    function=moe_route,
    # S, ORDER and NORM are the kernel's template arguments: an exported kernel reads them
    # from `route` (int32 (3,): S, ORDER, NORM) once per call
    export_dims={"E": "logits.shape[-1]", "S": "int(route[0].item())", "ORDER": "int(route[1].item())",
                 "NORM": "int(route[2].item())"},
    export_inputs=["(1, E)", "(3,)"],
    export_outputs=["(S,)", "(S,)"],
)
