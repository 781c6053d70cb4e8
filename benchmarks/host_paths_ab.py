"""Which host path a patched decode step should take: each half of a DecoderBlock's step
(the pre half: norm, q/k/v, RoPE; the post half: o projection, MLP) as a compiled trace
(`_Compiled`, what `patch` does today) or called directly (its tuned calls dispatched one by
one), and the block's check of its children (`_children_key`, every call) as it is or made
once. A patched step is host-bound, so what a path costs the host is what the model gains.

    python benchmarks/host_paths_ab.py [--model llama-3-8b] [--bits 4] [--layers 32]
                                       [--steps 40] [--rounds 3] [--config NAME ...] [--loop]
                                       [--out F [--force]]

One patched model; per configuration, decode_breakdown.step_breakdown's figures per step
(build, encode, wait, step, pipelined), the configurations run in turn, each round in the
reverse order of the last, medians over the rounds. Each configuration's logits after the
same steps are compared with the as-is configuration's (`same output`: bit for bit).
--loop: also, per round, microseconds per token of mlx-lm's own generation loop
(`hlh_mlx.validate.generate`: greedy sampling, the token read back each step) after prompts
of 64 and 512 tokens, for the patched model as is and for the unpatched one (the original
layers put back), beside the fixed-token loop of step_breakdown. Writes: a table to stdout; the JSON to F
only when --out F is given (an existing F is refused before anything runs, unless --force).
"""

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_breakdown import step_breakdown, warm_decode  # noqa: E402

from hlh_mlx import blocks, models, patching, paths  # noqa: E402
from hlh_mlx.validate import generate, random_prompt  # noqa: E402

CONFIGS = ("as_is", "plain_pre", "plain_post", "plain_both", "key_once", "key_once_plain_pre")


@contextmanager
def config(name: str):
    """The DecoderBlock class set up for one configuration, restored afterwards."""
    steps, key = blocks.DecoderBlock._steps, blocks.DecoderBlock._children_key

    def chosen_steps(self, x):
        pre, post = steps(self, x)
        plain = name.split("_plain_")[-1] if "_plain_" in name else name.removeprefix("plain_")
        if plain in ("pre", "both"):
            pre = pre.plain
        if plain in ("post", "both"):
            post = post.plain
        return pre, post

    def key_once(self):
        k = self.__dict__.get("_key_once")
        if k is None:
            k = key(self)
            object.__setattr__(self, "_key_once", k)
        return k
    if name != "as_is":
        blocks.DecoderBlock._steps = chosen_steps
    if name.startswith("key_once"):
        blocks.DecoderBlock._children_key = key_once
    try:
        yield
    finally:
        blocks.DecoderBlock._steps, blocks.DecoderBlock._children_key = steps, key


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", action="append", choices=CONFIGS, help="only these configurations (repeat)")
    ap.add_argument("--loop", action="store_true", help="also time mlx-lm's generation loop (see above)")
    paths.output_options(ap)
    a = paths.parse_refusing_overwrite(ap, argv, outputs)
    if a.rounds < 1 or a.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    return a


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    model, about = models.load(a.model, bits=a.bits, layers=a.layers)
    report = patching.patch(model)

    def one_step():  # from a fresh cache, prefilled and stepped the same way each time
        c, t = warm_decode(model)
        out = model(t, cache=c)
        mx.eval(out)
        return out
    configs = tuple(a.config or CONFIGS)
    want = one_step()
    same = {}
    for name in configs:
        with config(name):
            same[name] = bool(mx.array_equal(one_step(), want))
    runs = {n: [] for n in configs}
    loop = {f"{side}_prompt{p}": [] for side in ("patched", "unpatched") for p in (64, 512)} if a.loop else {}
    for r in range(a.rounds):
        for name in (configs if r % 2 == 0 else configs[::-1]):
            with config(name):
                runs[name].append(step_breakdown(model, a.steps))
        for key in (list(loop) if r % 2 == 0 else list(loop)[::-1]):
            side, p = key.split("_prompt")
            with report.unpatched() if side == "unpatched" else nullcontext():
                run = generate(model, random_prompt(model, about, int(p)), 64)
            loop[key].append(1e6 * run.decode_s / (len(run.tokens) - 1))
    rows = {n: {k: round(statistics.median(run[k] for run in rs), 1) for k in rs[0]} for n, rs in runs.items()}
    print(f"{'config':22} {'build':>8} {'encode':>8} {'wait':>8} {'step':>8} {'pipelined':>10}  same output")
    for n, r in rows.items():
        print(f"{n:22} {r['build_us']:8.0f} {r['encode_us']:8.0f} {r['wait_us']:8.0f} {r['step_us']:8.0f} "
              f"{r['pipelined_us']:10.0f}  {same[n]}")
    loop_us = {k: round(statistics.median(v), 1) for k, v in loop.items()}
    for k, v in loop_us.items():
        print(f"generation loop, {k}: {v:.0f} us a token ({1e6 / v:.1f} tok/s)")
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": a.model, "bits": a.bits, "layers": a.layers, "steps": a.steps, "rounds": a.rounds,
              "replaced": len(report.replaced), "same_output": same, "medians_us": rows, "runs_us": runs,
              "loop_us_per_token": loop_us, "loop_runs_us": loop}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
