"""The post half of a patched decoder block's decode step in its two MLP forms, measured
the way a model runs: norm_qgemv_swiglu (one launch) against rms_norm then qgemv_swiglu
(two launches, less GPU time when the fused prologue costs more than the separate norm).
mlx-lm's generation loop, both forms alternating on one patched model, uncompiled.

    python benchmarks/mlp_form_ab.py [--model llama-3-8b] [--layers 32] [--rounds 2] [--out F [--force]]

Writes: decode tok/s per form and round to stdout; the JSON to F only when --out F is given
(an existing F is refused before anything runs, unless --force).
"""

import argparse
import json
import time

import mlx.core as mx

from hlh_mlx import blocks, models, patching, paths, validate


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    model, about = models.load(a.model, bits=4, layers=a.layers)
    prompt = validate.random_prompt(model, about, 512)
    base = validate.measure(model, prompt, a.tokens, 3, "uncompiled")
    print(f"unpatched: decode {base['decode_tps']:.1f} tok/s")
    patching.patch(model)
    layers = [b for b in validate.decoder_blocks(model) if isinstance(b, blocks.DecoderBlock)]
    rows = []
    for r in range(a.rounds):
        for form in ("fused", "split"):
            for b in layers:
                object.__setattr__(b, "mlp_form", form)
                b.reset()
            m = validate.measure(model, prompt, a.tokens, 3, "uncompiled")
            rows.append({"round": r, "form": form, "decode_tps": m["decode_tps"],
                         "decode_tps_each": m.get("decode_tps_each"),
                         "tokens_identical": m["tokens"] == base["tokens"]})
            print(f"round {r} {form}: decode {m['decode_tps']:.1f} tok/s ({m['decode_tps'] / base['decode_tps']:.2f}x), "
                  f"tokens identical to unpatched: {rows[-1]['tokens_identical']}")
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": a.model, "layers": a.layers, "unpatched_decode_tps": base["decode_tps"], "runs": rows}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
