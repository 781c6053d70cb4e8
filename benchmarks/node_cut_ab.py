"""Did cutting a patched decode step's nodes pay? The same patched model decoding with the
step as it is now (one token's q/k/v reshaped to heads-first, one offset array per step)
and as it was before (three transposes per block, one offset slice per block), the two
alternating with the unpatched model in mlx-lm's generation loop (U A B U B A ...), so a
drifting machine moves all three alike.

    python benchmarks/node_cut_ab.py [--model llama-3-8b] [--layers 32] [--rounds 4] [--out F [--force]]

Writes: decode tok/s per side and round to stdout, then each side's median; the JSON to F
only when --out F is given (an existing F is refused before anything runs, unless --force).
"""

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import mlx.core as mx

from hlh_mlx import blocks, models, patching, paths, validate
from hlh_mlx.ops import rope as rope_op


def _qkv_before(self, x, offset):
    """DecoderBlock._qkv as it was: (B, T, heads, D), then three transposes."""
    a = self["self_attn"]
    b, t, _ = x.shape
    h = self["input_layernorm"](x)
    q, k, v = a.q_proj(h).reshape(b, t, a.n_heads, -1), a.k_proj(h).reshape(b, t, a.n_kv_heads, -1), \
        a.v_proj(h).reshape(b, t, a.n_kv_heads, -1)
    if "q_norm" in a:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    return a.rope(q, offset=offset), a.rope(k, offset=offset), v.transpose(0, 2, 1, 3)


def _offset_before(offset):
    """The offset array as it was: a slice of the position table per call (per block)."""
    rope_op._offset_array(offset)  # keeps the table large enough
    return rope_op.offset_input(offset)


def _set(side, layers, now):
    qkv_now, offset_now = now
    before = side == "before"
    blocks.DecoderBlock._qkv = _qkv_before if before else qkv_now
    blocks.offset_array = _offset_before if before else offset_now
    for b in layers:
        b.reset()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    model, about = models.load(a.model, bits=4, layers=a.layers)
    prompt = validate.random_prompt(model, about, 512)
    report = patching.patch(model)
    layers = [b for b in validate.decoder_blocks(model) if isinstance(b, blocks.DecoderBlock)]
    now = (blocks.DecoderBlock._qkv, blocks.offset_array)
    runs = {"unpatched": [], "now": [], "before": []}
    orders = [("unpatched", "now", "before"), ("before", "now", "unpatched")]
    tokens = {}
    for side in runs:  # warm-up: kernels built, steps traced
        with report.unpatched() if side == "unpatched" else nullcontext():
            _set(side, layers, now)
            tokens[side] = validate.generate(model, prompt, 4).tokens
    for r in range(a.rounds):
        for side in orders[r % 2]:
            with report.unpatched() if side == "unpatched" else nullcontext():
                _set(side, layers, now)
                run = validate.generate(model, prompt, a.tokens)
            runs[side].append(run.rates(len(prompt))["decode_tps"])
            tokens[side] = run.tokens
            print(f"round {r} {side:9s} decode {runs[side][-1]:.1f} tok/s")
    _set("now", layers, now)
    med = {s: statistics.median(v) for s, v in runs.items()}
    for s in ("now", "before"):
        print(f"{s:9s} median {med[s]:.1f} tok/s ({med[s] / med['unpatched']:.2f}x unpatched {med['unpatched']:.1f}), "
              f"tokens identical to unpatched: {tokens[s] == tokens['unpatched']}")
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": a.model, "layers": a.layers, "tokens": a.tokens, "runs": runs, "medians": med,
              "tokens_identical": {s: tokens[s] == tokens["unpatched"] for s in ("now", "before")}}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
