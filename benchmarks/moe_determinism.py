"""Does a model repeat itself? Where two identical greedy runs first differ.

    python benchmarks/moe_determinism.py [--model qwen1.5-moe-a2.7b] [--layers 24] [--tokens 32]
                                         [--prompt-tokens 64] [--patched] [--out F [--force]]

`hlh_mlx validate` on Qwen1.5-MoE found the unpatched model's own greedy tokens differing run
to run on the GPU (so a patched run cannot be held to them), and on Qwen2-7B both sides'.
This runs the same model twice on the same prompt through mlx-lm's cache, prefill then
greedy decode, recording at every position each block's output and, where the block calls
its MLP as a module, the MLP's output (for an MoE block also its chosen experts: its
router's top-k, recomputed from the block's input with mlx-lm's own routing code), and the
logits; it reports the first position, layer and kind of difference: the experts chosen (a
near-tie flipped by a non-deterministic op upstream), the MLP's output bits (with the same
experts: an op inside it), the block's output bits with the MLP's the same (attention or
the KV cache), or the logits only (the head). --patched runs the model as hlh_mlx.patch
leaves it (its fused blocks call no MLP module: block outputs only). A CPU run is a smoke
test (its ops are deterministic).

Writes: a summary to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from hlh_mlx import blocks, models, moe, paths, validate
from hlh_mlx.ops.moe_route import moe_route


class _Recorder:
    """Wraps an MoE block's `mlp`: records its input's routing and its output, per call."""

    def __init__(self, mlp, log: list):
        self.mlp, self.log = mlp, log

    def __call__(self, x):
        out = self.mlp(x)
        experts = None
        if type(self.mlp).__name__ in moe.ROUTERS:
            order, norm = moe.ROUTERS[type(self.mlp).__name__](self.mlp)
            inds, _ = moe_route(self.mlp.gate(x), moe.top_k(self.mlp), order, norm)  # mlx-lm's routing ops
            experts = np.asarray(mx.sort(inds[:, -1], axis=-1))
        self.log.append((experts, np.asarray(out[:, -1].astype(mx.float32))))
        return out


_BLOCK_LOGS: dict = {}  # id(block) -> its outputs, while a run records


def _recording(cls):
    """`cls` with a __call__ that records the block's output (mlx-lm models iterate over
    their own copy of the block list, so a block is recorded by its class, swapped for
    the run and back after)."""
    def __call__(self, x, *args, **kwargs):
        out = cls.__call__(self, x, *args, **kwargs)
        _BLOCK_LOGS[id(self)].append(np.asarray(out[:, -1].astype(mx.float32)))
        return out
    return type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})


def run_once(model, prompt: list, tokens: int) -> dict:
    from mlx_lm.models.cache import make_prompt_cache
    layers = validate.decoder_blocks(model)
    logs, block_logs = [[] for _ in layers], [[] for _ in layers]
    classes = [type(b) for b in layers]
    for b, log, blog in zip(layers, logs, block_logs):
        slot = blocks.mlp_slot(b)  # "mlp", or Mixtral's "block_sparse_moe"
        object.__setattr__(b, slot, _Recorder(b[slot], log))  # an instance attribute shadows the child
        _BLOCK_LOGS[id(b)] = blog
        b.__class__ = _recording(type(b))
    try:
        cache = make_prompt_cache(model)
        logits, out_tokens = [], []
        y = model(mx.array([prompt]), cache=cache)[:, -1]
        for i in range(tokens):  # position i: the logits of model call i (the prefill, then decode steps)
            logits.append(np.asarray(y.astype(mx.float32))[0])
            tok = int(mx.argmax(y, axis=-1).item())
            out_tokens.append(tok)
            if i + 1 < tokens:
                y = model(mx.array([[tok]]), cache=cache)[:, -1]
    finally:
        for b, cls in zip(layers, classes):
            vars(b).pop("mlp", None)  # the child module is found again
            b.__class__ = cls
            _BLOCK_LOGS.pop(id(b), None)
    return {"tokens": out_tokens, "logits": logits, "layers": logs, "blocks": block_logs}


def first_difference(a: dict, b: dict) -> dict | None:
    """The first (position, layer) where run b departs from run a, and how."""
    blocks_a, blocks_b = a.get("blocks") or [[] for _ in a["layers"]], b.get("blocks") or [[] for _ in b["layers"]]
    for pos in range(min(len(a["logits"]), len(b["logits"]))):
        for layer, (la, lb) in enumerate(zip(a["layers"], b["layers"])):
            if pos < len(la) and pos < len(lb):  # the block called its MLP as a module
                (ia, oa), (ib, ob) = la[pos], lb[pos]
                if ia is not None and not np.array_equal(ia, ib):
                    return {"position": pos, "layer": layer, "kind": "experts chosen",
                            "experts_a": ia.tolist(), "experts_b": ib.tolist()}
                if not np.array_equal(oa, ob):
                    return {"position": pos, "layer": layer, "kind": "block output bits (same experts)"
                            if ia is not None else "MLP output bits",
                            "max_abs_difference": float(np.max(np.abs(oa - ob)))}
            ba, bb = blocks_a[layer], blocks_b[layer]
            if pos < len(ba) and pos < len(bb) and not np.array_equal(ba[pos], bb[pos]):
                return {"position": pos, "layer": layer, "kind": "block output bits (its MLP's the same)"
                        if pos < len(la) else "block output bits",
                        "max_abs_difference": float(np.max(np.abs(ba[pos] - bb[pos])))}
        if not np.array_equal(a["logits"][pos], b["logits"][pos]):
            return {"position": pos, "layer": None, "kind": "logits only",
                    "max_abs_difference": float(np.max(np.abs(a["logits"][pos] - b["logits"][pos])))}
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--patched", action="store_true", help="as hlh_mlx.patch leaves the model")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main(argv=None):
    a = parse_args(argv)
    model, about = models.load(a.model, bits=a.bits, layers=a.layers)
    if a.patched:
        import hlh_mlx
        hlh_mlx.patch(model)
    layers = validate.decoder_blocks(model)
    prompt = validate.random_prompt(model, about, a.prompt_tokens)
    runs = [run_once(model, prompt, a.tokens) for _ in range(2)]
    diff = first_difference(*runs)
    result = {"device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"), "mlx": mx.__version__,
              "model": a.model, "patched": a.patched, "layers": len(layers), "tokens": a.tokens,
              "tokens_equal": runs[0]["tokens"] == runs[1]["tokens"], "first_difference": diff}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
