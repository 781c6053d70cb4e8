"""Where the host time of one call goes: a built-in, the same op through hlh_mlx.tuned
(a variant, and a fallback), and each step of the tuned path alone.

    python benchmarks/host_overhead.py [--small] [--out F [--force]]   # microseconds per call

(--small: small shapes, for a smoke run on a CPU.)

Writes: the times to stdout (a list, then JSON), and the JSON to F only when --out F (or
--json F) is given; an existing F is refused before anything is timed, unless --force.

A decode loop is host-bound when its GPU work per token is shorter than the Python and
MLX work that builds it; there a tuned kernel that saves GPU time can still slow the loop
down. The tuned path is: the call's signature (shapes, dtypes, other arguments), one
dictionary lookup, then the plan: the built-in for a fallback, or the variant's launch,
compiled on Metal/CUDA so a replay skips the binding and MLX's own per-call work of a
custom-kernel call (shown alone as "raw custom-kernel call").
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from hlh_mlx import backends, ops, paths, runtime, tuned

CALLS = 2000


def per_call_us(fn) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(5):
        outs = []
        t = time.perf_counter()
        for _ in range(CALLS):
            outs.append(fn())
        best = min(best, (time.perf_counter() - t) / CALLS * 1e6)
        del outs
    return best


def case(name, op_name, builtin, tuned_fn, args, kwargs):
    op = ops.get(op_name)
    res = {"builtin": per_call_us(lambda: builtin(*args, **kwargs)),
           "tuned": per_call_us(lambda: tuned_fn(*args, **kwargs)),
           "explain": tuned.explain(op_name, *args, **kwargs)}
    res["tuned over built-in"] = res["tuned"] - res["builtin"]
    res["signature"] = per_call_us(lambda: runtime.signature(args, kwargs, tuple(op.dynamic)))
    key = runtime.signature(args, kwargs, tuple(op.dynamic))
    plan = tuned_fn.plans[key]
    res["plan alone"] = per_call_us(lambda: plan(*args, **kwargs))
    fallback = runtime._fallback_plan(op_name, "forced for this measurement", builtin)
    res["fallback plan alone"] = per_call_us(lambda: fallback(*args, **kwargs))
    call = runtime._bind(op, args, kwargs)
    choice = runtime.choose(op_name, call)
    if choice.variant is not None:
        launch = runtime._kernel(choice.variant).launcher(call.shape, call.dtype, op.output_shapes(call.shape),
                                                          op.output_dtypes(mx.float16))
        res["raw custom-kernel call"] = per_call_us(lambda: launch(*call.inputs))
        core = runtime.compiled_for(runtime.backend(), launch)
        res["compiled custom-kernel call"] = per_call_us(lambda: core(*call.inputs))
        res["binding (op.bind)"] = per_call_us(lambda: op.bind(*args, **kwargs))
    return {name: {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes: a smoke run on a CPU")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    args = parse_args()
    small = args.small
    rng = np.random.default_rng(0)
    be = backends.auto()
    out = {"device": backends.device(be).name, "backend": be, "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d")}
    qs = {"N": 256, "K": 512, "G": 64} if small else {"N": 14336, "K": 4096, "G": 64}
    x, w, s, b = ops.get("qgemv").make_inputs(qs, mx.float16, rng)
    mx.eval(x, w, s, b)
    out.update(case("quantized_matmul", "qgemv", mx.quantized_matmul, tuned.quantized_matmul, (x, w, s, b),
                    dict(transpose=True, group_size=qs["G"], bits=4)))
    c = 256 if small else 4096
    xr = mx.random.normal((1, 1, c)).astype(mx.float16)
    wr = mx.random.normal((c,)).astype(mx.float16)
    out.update(case("rms_norm", "rms_norm", mx.fast.rms_norm, tuned.rms_norm, (xr, wr, 1e-5), {}))
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    out.update(case("rope", "rope", mx.fast.rope, tuned.rope, (q, 128),
                    dict(traditional=False, base=500000.0, scale=1.0, offset=100, freqs=None)))
    for name, res in out.items():
        if isinstance(res, dict):
            print(name)
            for k, v in res.items():
                print(f"  {k}: {v:.2f} us" if isinstance(v, float) else f"  {k}: {v}")
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
