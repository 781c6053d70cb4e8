"""A whole decode step as one compiled call (hlh_mlx.decode_step) against the same model
run block by block: host time per step (graph building, MLX's encoding), GPU wait, the
pipelined step (mlx-lm's loop), the step's node count, and greedy tokens through mlx-lm's
generation loop compared with the unpatched model's.

    python benchmarks/decode_stack.py [--model llama-3-8b] [--bits 4] [--layers 8] [--steps 30]
                                      [--tokens 48] [--out F [--force]]

Four ways of running one model, in one process:
  unpatched        mlx-lm's model as it comes
  unpatched_stack  its blocks compiled unfused and the stack one compiled call
                   (what `validate`'s "compiled" mode runs on the unpatched side)
  patched_blocks   `hlh_mlx.patch` with the stack left out: each block's two compiled halves
  patched_stack    `hlh_mlx.patch` as it leaves the model
and, with --probes, two that tell where the stack's time goes:
  patched_always   patched blocks running all four fused ops (fused="always"), no stack
  stack_unmasked   the stack with its masked attention replaced by the built-in over the
                   whole buffer (wrong numbers: a cost probe, its tokens are not compared)
The environment's MLX settings (MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER, ...) are
recorded beside the figures: run it once per setting to compare them.
Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_breakdown import step_breakdown  # noqa: E402
from decode_graph import step_nodes  # noqa: E402

from hlh_mlx import blocks, models, patching, paths, validate  # noqa: E402


def run_side(model, steps, tokens, prompt) -> dict:
    r = dict(step_breakdown(model, steps))
    r["nodes_by_primitive"] = step_nodes(model)
    r["nodes"] = sum(r["nodes_by_primitive"].values())
    validate.generate(model, prompt, 4)  # warm-up
    run = validate.generate(model, prompt, tokens)
    r["tokens"] = run.tokens
    r["decode_tps"] = run.rates(len(prompt))["decode_tps"]
    return r


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--probes", action="store_true", help="also patched_always and stack_unmasked")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    model, _ = models.load(a.model, bits=a.bits, layers=a.layers)
    prompt = list(range(1, a.prompt_tokens + 1))
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    res = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
           "model": a.model, "bits": a.bits, "layers": a.layers, "env": env, "sides": {}}
    sides = res["sides"]
    sides["unpatched"] = run_side(model, a.steps, a.tokens, prompt)
    with validate.compiled_blocks(model):
        sides["unpatched_stack"] = run_side(model, a.steps, a.tokens, prompt)
    report = patching.patch(model)
    stack = model.model
    model.model = stack._inner
    sides["patched_blocks"] = run_side(model, a.steps, a.tokens, prompt)
    model.model = stack
    sides["patched_stack"] = run_side(model, a.steps, a.tokens, prompt)
    if a.probes:
        model.model = stack._inner
        for b in model.model.layers:
            object.__setattr__(b, "_fused", "always")
            b.reset()
        sides["patched_always"] = run_side(model, a.steps, a.tokens, prompt)
        model.model = stack
        blocks.masked_decode_attention = lambda q, k, v, mask, scale: \
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        blocks.resets[0] += 1
        sides["stack_unmasked"] = run_side(model, a.steps, a.tokens, prompt)
    res["patch"] = str(report)
    base = sides["unpatched"]["tokens"]
    print(f"{a.model} {a.bits}-bit, {a.layers} layers, {res['device']}, MLX {res['mlx']}, env {env or '{}'}")
    print(f"{'side':16s} {'build':>7s} {'encode':>7s} {'wait':>7s} {'pipelined':>9s} {'nodes':>6s} "
          f"{'tok/s':>7s}  tokens")
    for name, r in sides.items():
        div = validate.first_divergence(base, r["tokens"]) if name != "stack_unmasked" else "n/a"
        r["first_divergence"] = div
        print(f"{name:16s} {r['build_us']:7.0f} {r['encode_us']:7.0f} {r['wait_us']:7.0f} {r['pipelined_us']:9.0f} "
              f"{r['nodes']:6d} {r['decode_tps'] or 0:7.1f}  {'identical' if div is None else f'differ at {div}'}")
    for name, r in sides.items():
        print(f"{name:16s} " + ", ".join(f"{k} {v}" for k, v in r["nodes_by_primitive"].items()))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
