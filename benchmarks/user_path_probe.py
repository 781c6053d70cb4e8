"""Why a tuned call can cost a program more than its sweep said: the same variant timed the
way the sweep times it and the way a user's call runs it.

    python benchmarks/user_path_probe.py [--case OP:SHAPE ...] [--out F [--force]]

On the H200 `tuned_calls.py` found decode_attention 32x8x1024x64 at 70.8 us a call in a
chain through `hlh_mlx.tuned` where its sweep had timed the chosen variant at 21.0 us (and the
built-in at 29-37 us both times), and rope 8x1x128 slower than the built-in where the sweep
had it faster. For each case, in a chain of dependent calls over the same rotated input sets
(`hlh_mlx.timing`, as the sweep measures), and the host time of one call (build + encode):
- builtin: the MLX built-in as a user calls it (`tuned_calls.calls`);
- tuned: `hlh_mlx.tuned.<op>` as a user calls it (user-level arguments, the dispatch hot
  path, the plan's argument mapping);
- sweep: the variant the runtime chose, launched on the op's kernel-layout inputs through
  `runtime.dispatched` (what the sweep timed);
- kernel: the same launch with no dispatch around it.
A gap between tuned and sweep is the user path's own cost; between sweep and kernel the
dispatch's. Writes a table to stdout and the JSON to F only when --out F is given.
"""

import argparse
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tuned_calls import calls as user_calls  # noqa: E402

from hlh_mlx import backends, ops, paths, runtime, timing, tuned  # noqa: E402

CASES = ["decode_attention:32x8x1024x64", "rope:8x1x128x0", "qgemv:14336x4096x64",
         "moe_qgemv_combine:4x60x2048x1408x64"]


def sides(op_name, shape, first):
    """{side: function of the kernel-layout inputs}, and the variant the runtime chose (or None)."""
    op = ops.get(op_name)
    if op_name == "moe_qgemv_combine":
        g = shape["G"]
        builtin = lambda *a: op.function(*a, group_size=g)  # noqa: E731
        tuned_fn = lambda *a: tuned.moe_qgemv_combine(*a, group_size=g)  # noqa: E731
    else:
        builtin, tuned_fn = user_calls(op_name, shape, first)
    out = {"builtin": builtin, "tuned": tuned_fn}
    runtime.refresh()
    mx.eval(tuned_fn(*first))
    chosen = [c for (name, _, _), c in runtime._choices.items() if name == op_name]
    variant = chosen[-1].variant if chosen else None
    if variant is not None:
        launch = backends.Kernel(variant, runtime.backend()).launcher(
            shape, "float16", op.output_shapes(shape), op.output_dtypes(mx.float16))
        out["sweep"] = runtime.dispatched(runtime.compiled_for(runtime.backend(), launch))
        out["kernel"] = launch
    return out, variant


def measure(case: str) -> dict:
    op_name, shape_text = case.split(":")
    op = ops.get(op_name)
    shape = op.parse_shape(shape_text)
    rng = np.random.default_rng(0)
    first = op.make_inputs(shape, mx.float16, rng)
    sets, resident = timing.input_sets(lambda: op.make_inputs(shape, mx.float16, rng), sum(a.nbytes for a in first))
    fns, variant = sides(op_name, shape, first)
    row = {"case": case, "variant": variant.id if variant else None, "cache_resident": resident,
           "decisions": {" ".join(k): v for k, v in runtime.decisions().items()}}
    for rnd in range(2):  # each side twice, the order reversed the second time
        for side, fn in (list(fns.items()) if rnd == 0 else list(fns.items())[::-1]):
            t = timing.measure(fn, sets, cache_resident=resident)
            build, encode = timing.host_parts(fn, sets[0])
            row.setdefault(side, []).append({"chain_us": round(1e3 * t.median_ms, 2), "spread": round(t.spread, 3),
                                             "build_us": round(build, 2), "encode_us": round(encode, 2)})
            mx.clear_cache()
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help=f"OP:SHAPE (repeat; default {' '.join(CASES)})")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    rows = []
    for case in a.case or CASES:
        try:
            row = measure(case)
        except Exception as e:  # one case's failure must not cost the others (one device call runs them all)
            print(f"{case}: failed: {type(e).__name__}: {e}")
            rows.append({"case": case, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        for side in ("builtin", "tuned", "sweep", "kernel"):
            for r in row.get(side, []):
                print(f"{case:38s} {side:8s} chain {r['chain_us']:7.1f} us (±{100 * r['spread']:.0f}%)  "
                      f"build {r['build_us']:5.1f}  encode {r['encode_us']:5.1f} us")
    result = {"mlx": mx.__version__, "device": backends.device(runtime.backend()).name,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
