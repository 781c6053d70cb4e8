"""What a program sees when it calls `hlh_mlx.tuned.<op>` instead of the MLX built-in.

    python benchmarks/tuned_calls.py [--small] [--out FILE [--force]]

Writes: the table and a JSON summary to stdout; the summary with every row to FILE only
when --out FILE (or --json FILE) is given. An existing FILE is refused before anything is
measured, unless --force (the recorded results under benchmarks/results/ are replaced only
on purpose).

For each LLM-sized case (norms, softmax, SwiGLU, RoPE, gemv, 4-bit gemv, matmul, decode
attention; fp16), both sides called with the user's own arguments, as a model calls them:
- chain ms: latency of one call in a dependent chain (each call consumes the previous
  call's output; other inputs rotate through 2 GB so the L2 does not flatter anyone);
- host us: building one call on the host (no evaluation), uncompiled, and inside a
  function the user compiled with mx.compile;
- e2e: built-in (chain + host) / tuned (chain + host), uncompiled and compiled;
- each side measured --rounds times, alternating which goes first; each figure the median;
- which variant ran, or why the built-in ran (hlh_mlx.tuned.explain).
Results of the sweeps on this device decide what runs: sweep first (benchmarks/device_ops.sh).
"""

import argparse
import json
import math
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hlh_mlx import backends, ops, paths, timing, tuned

CASES = [  # (op, shape): the op's default sweep shapes and the decode shapes of Llama-3-8B
    ("rms_norm", "1x4096"), ("rms_norm", "128x4096"), ("rms_norm", "8192x4096"),
    ("layer_norm", "1x4096"), ("layer_norm", "128x4096"), ("layer_norm", "8192x4096"),
    ("softmax", "32x32000"), ("softmax", "8192x4096"),
    ("swiglu", "1x14336"), ("swiglu", "128x14336"), ("swiglu", "8192x14336"),
    ("rope", "32x1x128x0"), ("rope", "8x1x128x0"), ("rope", "32x4096x128x0"), ("rope", "32x4096x128x1"),
    ("gemv", "1x4096x4096"), ("gemv", "1x14336x4096"), ("gemv", "1x4096x14336"), ("gemv", "1x1024x4096"),
    ("qgemv", "4096x4096x64"), ("qgemv", "14336x4096x64"), ("qgemv", "4096x14336x64"), ("qgemv", "1024x4096x64"),
    ("qgemv", "14336x4096x128"), ("qgemv", "4096x14336x128"),
    ("matmul", "1024x1024x1024"), ("matmul", "512x4096x4096"), ("matmul", "4096x4096x4096"),
    ("decode_attention", "32x8x4096x128"), ("decode_attention", "32x32x4096x128"),
    ("decode_attention", "32x8x1024x64"),
    ("gemv", "1x14336x4096"), ("qgemv", "14336x4096x64"),  # timed twice: how far two runs of one case drift
]
SMALL = [("rms_norm", "4x256"), ("softmax", "4x256"), ("rope", "4x2x64x0"), ("qgemv", "64x512x64"),
         ("gemv", "1x64x512")]


# inputs the user-level call reads, where fewer than the kernel's: the compiled host figure
# traces what a user's compiled function takes, not the kernel's own constants
USER_INPUTS = {"rms_norm": 2, "rope": 1, "decode_attention": 3}


def calls(op_name, shape, inputs):
    """(built-in, tuned) as a user calls them, over the kernel's input layout (the first
    input is the one a chain feeds). Some take only the leading inputs (`*_`: the kernel's
    own eps, freqs, offset, made inside the call as the runtime makes them): USER_INPUTS."""
    if op_name == "rms_norm":
        return (lambda x, w, *_: mx.fast.rms_norm(x, w, 1e-5)), (lambda x, w, *_: tuned.rms_norm(x, w, 1e-5))  # eps is data in the kernel's layout
    if op_name == "layer_norm":
        return (lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5)), (lambda x, w, b: tuned.layer_norm(x, w, b, 1e-5))
    if op_name == "softmax":
        return (lambda x: mx.softmax(x, axis=-1)), (lambda x: tuned.softmax(x, axis=-1))
    if op_name == "swiglu":
        return (lambda g, u: nn.silu(g) * u), tuned.swiglu
    if op_name == "rope":
        kw = dict(traditional=bool(shape["TRAD"]), base=10000.0, scale=1.0, offset=7)
        return ((lambda x, *_: mx.fast.rope(x, x.shape[-1], **kw)), (lambda x, *_: tuned.rope(x, x.shape[-1], **kw)))
    if op_name == "gemv":
        return (lambda x, w: x @ w.T), tuned.gemv
    if op_name == "qgemv":
        g = shape["G"]
        return ((lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=g, bits=4)),
                (lambda x, w, s, b: tuned.quantized_matmul(x, w, s, b, transpose=True, group_size=g, bits=4)))
    if op_name == "matmul":
        return mx.matmul, tuned.matmul
    if op_name == "decode_attention":
        hq, hkv, d = shape["HQ"], shape["HKV"], shape["D"]
        sc = d ** -0.5

        def user(f):
            return lambda q, k, v, *_: f(q.reshape(1, hq, 1, d), k.reshape(1, hkv, -1, d), v.reshape(1, hkv, -1, d),
                                         scale=sc).reshape(hq, d)
        return user(mx.fast.scaled_dot_product_attention), user(tuned.scaled_dot_product_attention)
    raise KeyError(op_name)


def measure_case(op_name, shape_text, dtype=mx.float16, rounds: int = 2):
    op = ops.get(op_name)
    shape = op.parse_shape(shape_text)
    rng = np.random.default_rng(0)
    first = op.make_inputs(shape, dtype, rng)
    sets, resident = timing.input_sets(lambda: op.make_inputs(shape, dtype, rng), sum(a.nbytes for a in first))
    builtin, tuned_fn = calls(op_name, shape, first)
    row = {"op": op_name, "shape": shape_text, "dtype": "float16",
           "explain": _explain(op_name, builtin, tuned_fn, sets[0])}
    # the sides alternate (B T, T B, ...) and each figure is the median over the rounds: a
    # machine that drifts during a case moves both sides alike (a fallback runs the built-in
    # itself, and measured once each way it differed by up to 2x from clock drift alone)
    sides = [("builtin", builtin), ("tuned", tuned_fn)]
    runs: dict = {}
    for r in range(rounds):
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            t = timing.measure(fn, sets, cache_resident=resident)
            row["link"] = t.link
            for key, value in ((f"{side}_chain_ms", t.median_ms), (f"{side}_spread", round(t.spread, 4)),
                               (f"{side}_host_us", timing.host_us(fn, sets[0])),
                               (f"{side}_host_compiled_us",
                                timing.host_us(mx.compile(fn), sets[0][:USER_INPUTS.get(op_name)]))):
                runs.setdefault(key, []).append(value)
            mx.clear_cache()
    row.update({key: statistics.median(values) for key, values in runs.items()})
    row["rounds"] = {key: values for key, values in runs.items() if not key.endswith("spread")}
    b, v = row["builtin_chain_ms"], row["tuned_chain_ms"]
    row["gpu_x"] = b / v
    row["e2e_x"] = (b + row["builtin_host_us"] / 1e3) / (v + row["tuned_host_us"] / 1e3)
    row["e2e_compiled_x"] = (b + row["builtin_host_compiled_us"] / 1e3) / (v + row["tuned_host_compiled_us"] / 1e3)
    row["cache_resident"] = resident
    # both sides must agree on the same inputs (the tuned side is a checked variant or the built-in)
    y0, y1 = builtin(*sets[0]), tuned_fn(*sets[0])
    row["max_rel_diff"] = float(mx.max(mx.abs(y0.astype(mx.float32) - y1.astype(mx.float32))).item()
                                / max(float(mx.max(mx.abs(y0.astype(mx.float32))).item()), 1e-30))
    # a guard against wrong answers, not a precision check (the variants were checked): a
    # fallback is the built-in, a variant within rounding of it
    bound = max(10 * op.tolerance["float16"], 1e-2)
    if not row["max_rel_diff"] <= bound:
        row["error"] = (f"the tuned call answers differently from the built-in: largest difference "
                        f"{row['max_rel_diff']:.3g} of the largest value (bound {bound:g})")
    return row


def _explain(op_name, builtin, tuned_fn, inputs):
    # fallbacks() counts a distinct call once: forget earlier decisions, so that this call
    # is decided (and counted, if it falls back) here even if an earlier case made it
    tuned.refresh()
    before = sum(tuned.fallbacks().values())
    mx.eval(tuned_fn(*inputs))
    fell_back = sum(tuned.fallbacks().values()) > before
    return ("built-in (fallback)" if fell_back else "tuned") + ": " + _last_choice(op_name)


def _last_choice(op_name):
    from hlh_mlx import runtime
    choices = [c for (name, _, _), c in runtime.decisions().items() if name == op_name]
    return choices[-1] if choices else "?"


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {n})")
    return n


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test on any machine")
    paths.output_options(ap)
    ap.add_argument("--only", action="append", default=[], help="only these ops (repeat)")
    ap.add_argument("--rounds", type=_positive, default=2,
                    help="times each side is measured, the order alternating (default 2: B T, then T B)")
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    args = parse_args()
    be = backends.auto()
    rows = []
    for op_name, shape in (SMALL if args.small else CASES):
        if args.only and op_name not in args.only:
            continue
        try:
            rows.append(measure_case(op_name, shape, rounds=args.rounds))
        except Exception as e:  # one broken case must not cost the others' numbers
            rows.append({"op": op_name, "shape": shape, "error": f"{type(e).__name__}: {e}"})
        r = rows[-1]
        if "error" in r:
            print(f"{op_name:17s} {shape:16s} ERROR {r['error']}", flush=True)
            if "e2e_x" in r:  # timed, but answering wrongly: its figures mean nothing
                r["e2e_x_if_it_were_right"] = r.pop("e2e_x")
        else:
            print(f"{op_name:17s} {shape:16s} chain {r['builtin_chain_ms'] * 1e3:8.1f} -> {r['tuned_chain_ms'] * 1e3:8.1f} us"
                  f"  host {r['builtin_host_us']:5.1f} -> {r['tuned_host_us']:5.1f} us"
                  f" (compiled {r['builtin_host_compiled_us']:4.1f} -> {r['tuned_host_compiled_us']:4.1f})"
                  f"  e2e {r['e2e_x']:.2f}x compiled {r['e2e_compiled_x']:.2f}x  {r['explain'][:60]}", flush=True)
    ok = [r for r in rows if "error" not in r]
    tuned_rows = [r for r in ok if r["explain"].startswith("tuned")]
    geo = lambda xs: math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None  # noqa: E731
    summary = {
        "device": backends.device(be).name, "backend": be, "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d"),
        "cases": len(rows), "tuned_cases": len(tuned_rows), "fallback_cases": len(ok) - len(tuned_rows),
        "errors": len(rows) - len(ok),
        "geomean_e2e_all": geo([r["e2e_x"] for r in ok]), "geomean_e2e_tuned": geo([r["e2e_x"] for r in tuned_rows]),
        "geomean_e2e_compiled_all": geo([r["e2e_compiled_x"] for r in ok]),
        "min_e2e": min((r["e2e_x"] for r in ok), default=None),
        "min_e2e_compiled": min((r["e2e_compiled_x"] for r in ok), default=None),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**summary, "rows": rows}, f, indent=2)
    if summary["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
