"""Does an unpatched MoE model repeat itself? Where two identical greedy runs first differ.

    python benchmarks/moe_determinism.py [--model qwen1.5-moe-a2.7b] [--layers 24] [--tokens 32]
                                         [--prompt-tokens 64] [--out F [--force]]

`hlh_mlx validate` on Qwen1.5-MoE found the unpatched model's own greedy tokens differing run
to run on the GPU (so a patched run cannot be held to them). This runs the same model twice
on the same prompt through mlx-lm's cache, prefill then greedy decode, recording at every
position each MoE block's chosen experts (its router's top-k, recomputed from the block's
input with mlx-lm's own routing code) and the logits, and reports the first position,
layer and kind of difference: the experts chosen (a near-tie flipped by a non-deterministic
op upstream), the block's output bits with the same experts (an op inside the block), or the
logits only (the head). A CPU run is a smoke test (its ops are deterministic).

Writes: a summary to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import json
import sys
import time

import mlx.core as mx
import numpy as np

from hlh_mlx import models, moe, paths, validate
from hlh_mlx.ops.moe_route import moe_route


class _Recorder:
    """Wraps an MoE block's `mlp`: records its input's routing and its output, per call."""

    def __init__(self, mlp, log: list):
        self.mlp, self.log = mlp, log

    def __call__(self, x):
        out = self.mlp(x)
        order, norm = moe.ROUTERS[type(self.mlp).__name__](self.mlp)
        inds, _ = moe_route(self.mlp.gate(x), self.mlp.top_k, order, norm)  # mlx-lm's routing ops
        self.log.append((np.asarray(mx.sort(inds[:, -1], axis=-1)), np.asarray(out[:, -1].astype(mx.float32))))
        return out


def run_once(model, prompt: list, tokens: int) -> dict:
    from mlx_lm.models.cache import make_prompt_cache
    layers = validate.decoder_blocks(model)
    logs = [[] for _ in layers]
    for b, log in zip(layers, logs):
        object.__setattr__(b, "mlp", _Recorder(b.mlp, log))  # an instance attribute shadows the child
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
        for b in layers:
            vars(b).pop("mlp", None)  # the child module is found again
    return {"tokens": out_tokens, "logits": logits, "layers": logs}


def first_difference(a: dict, b: dict) -> dict | None:
    """The first (position, layer) where run b departs from run a, and how."""
    for pos in range(min(len(a["logits"]), len(b["logits"]))):
        for layer, (la, lb) in enumerate(zip(a["layers"], b["layers"])):
            if pos >= len(la) or pos >= len(lb):
                break
            (ia, oa), (ib, ob) = la[pos], lb[pos]
            if not np.array_equal(ia, ib):
                return {"position": pos, "layer": layer, "kind": "experts chosen",
                        "experts_a": ia.tolist(), "experts_b": ib.tolist()}
            if not np.array_equal(oa, ob):
                return {"position": pos, "layer": layer, "kind": "block output bits (same experts)",
                        "max_abs_difference": float(np.max(np.abs(oa - ob)))}
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
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main(argv=None):
    a = parse_args(argv)
    model, about = models.load(a.model, bits=a.bits, layers=a.layers)
    layers = validate.decoder_blocks(model)
    if not any(moe.why_not(b.mlp) is None for b in layers):
        sys.exit(f"{a.model}: no MoE block whose routing hlh_mlx.moe knows")
    prompt = validate.random_prompt(model, about, a.prompt_tokens)
    runs = [run_once(model, prompt, a.tokens) for _ in range(2)]
    diff = first_difference(*runs)
    result = {"device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"), "mlx": mx.__version__, "model": a.model, "layers": len(layers), "tokens": a.tokens,
              "tokens_equal": runs[0]["tokens"] == runs[1]["tokens"], "first_difference": diff}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
