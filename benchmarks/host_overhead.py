"""Where the host time of one call goes: a built-in, the same op through hlh_mlx.tuned
(a variant, or a fallback), each step of the tuned path alone, and the same call through
an hlh_mlx.nn layer (which remembers its plan) against mlx.nn's layer.

    python benchmarks/host_overhead.py [--small] [--calls N] [--repeats R] [--clock wall|thread] [--out F [--force]]

(Run it from the checkout with PYTHONPATH=. so it times this checkout's hlh_mlx, not an
installed one. --small: small shapes, for a run on a CPU. On the CPU back end every tuned call is a
fallback decided in Python: the numbers say what that path costs, and "traced stub" what
a GPU's tuned path costs structurally: the op's compiled function, with the built-in
where the variant's kernel would be.)

Writes: the times to stdout (a list, then JSON), and the JSON to F only when --out F (or
--json F) is given; an existing F is refused before anything is timed, unless --force.

A decode loop is host-bound when its GPU work per token is shorter than the Python and
MLX work that builds it; there a tuned kernel that saves GPU time can still slow the loop
down. The tuned path on Metal/CUDA is the op's compiled function: its keywords numbered, a dynamic
value (rope's offset) made data, one `mx.compile` replay of the plan (the built-in for a
fallback, or the variant's launch: MLX's per-call work of a custom-kernel call, shown alone
as "raw custom-kernel call", is skipped). Elsewhere (the emulator), and for arguments MLX
cannot trace: the call's signature (shapes, dtypes, other arguments), one dictionary
lookup, then the plan.

Timing: microseconds per call, --calls calls per measurement (graphs built, not evaluated),
the calls of one case alternated and repeated (--repeats), the best repeat kept. --clock
wall (default) times elapsed time; --clock thread this thread's CPU time
(time.thread_time), which other processes on a shared machine do not inflate. Compare
numbers within one run, or between runs on one machine with the same clock.
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as base_nn
import numpy as np

from hlh_mlx import backends, ops, paths, runtime, tuned
from hlh_mlx import nn as hnn

CALLS = 2000


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = [time.perf_counter]
calls = [CALLS]


def per_call_us(fn, repeats: int = 5) -> float:
    return timed({"fn": fn}, repeats)["fn"]


def timed(fns: dict, repeats: int = 5) -> dict:
    """{name: best microseconds per call}, the functions alternated within each repeat."""
    for fn in fns.values():
        mx.eval(fn())
    now = clock[0]
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            outs = []
            t = now()
            for _ in range(calls[0]):
                outs.append(fn())
            best[name] = min(best[name], (now() - t) / calls[0] * 1e6)
            del outs
    return best


def compiled_stub(builtin, args, kwargs):
    """The built-in with the other arguments fixed, compiled, called with the arrays alone:
    what replaying a one-node trace costs."""
    pos = [i for i, a in enumerate(args) if type(a) is mx.array]
    fixed = list(args)

    def fn(*arrays):
        a = list(fixed)
        for i, x in zip(pos, arrays):
            a[i] = x
        return builtin(*a, **kwargs)
    core = mx.compile(fn)
    return lambda: core(*[args[i] for i in pos])


def traced_stub(op_name, builtin):
    """A tuned call's path on a back end that replays kernels (`runtime.Dispatch._trace`),
    with the built-in where the variant's kernel would be: the keywords numbered, dynamic
    values made data, one compiled function replayed. On a CPU, where the tuned path
    decides in Python, this is what that path costs a GPU's call structurally."""
    d = runtime.Dispatch(op_name, builtin, doc="a stub for host_overhead.py")
    d._set_converters(ops.get(op_name).dynamic)
    d._traced = mx.compile(lambda kid, *flat: (lambda a, k: builtin(*a, **k))(*d.unflatten(kid, flat)))
    entry = tuned.ENTRIES.get(op_name)  # the op's fixed-signature entry, as `tuned.<op>` has it
    return entry(d.function) if entry else d.function


def case(name, op_name, builtin, tuned_fn, args, kwargs, repeats):
    op = ops.get(op_name)
    dynamic = tuple(op.dynamic)
    tuned_fn(*args, **kwargs)  # decided: the plan is remembered
    plan = tuned_fn.plan_for(args, kwargs)  # what a call decided in Python runs
    call = runtime._bind(op, args, kwargs)
    choice = runtime.choose(op_name, call)
    stub = traced_stub(op_name, builtin)
    stub(*args, **kwargs)
    replay = compiled_stub(builtin, args, kwargs)
    # each difference from a pair timed alone: what else runs between the calls moves
    # the CPU built-ins' times (rope's by 2 us), not alike for both
    res = timed({"builtin": lambda: builtin(*args, **kwargs), "tuned": lambda: tuned_fn(*args, **kwargs)}, repeats)
    res.update(timed({"signature": lambda: runtime.signature(args, kwargs, dynamic),
                      "plan alone": lambda: plan(*args, **kwargs)}, repeats))
    res.update(timed({"tuned path, traced stub": lambda: stub(*args, **kwargs),
                      "one-node replay alone": replay}, repeats))
    res["path"] = ("fallback" if choice.variant is None else "variant") + \
        (", traced" if tuned_fn.dispatch._traced is not None else ", decided in Python")
    res["explain"] = str(choice)
    res["tuned over built-in"] = res["tuned"] - res["builtin"]
    if choice.variant is None:
        res["fallback over built-in"] = res["tuned"] - res["builtin"]
    res["traced stub over the built-in"] = res["tuned path, traced stub"] - res["builtin"]
    res["traced stub over a one-node replay"] = res["tuned path, traced stub"] - res["one-node replay alone"]
    if choice.variant is not None:
        launch = runtime._kernel(choice.variant).launcher(call.shape, call.dtype, op.output_shapes(call.shape),
                                                          op.output_dtypes(mx.float16))
        core = runtime.compiled_for(runtime.backend(), launch)
        res.update(timed({"raw custom-kernel call": lambda: launch(*call.inputs),
                          "compiled custom-kernel call": lambda: core(*call.inputs),
                          "binding (op.bind)": lambda: op.bind(*args, **kwargs)}, repeats))
    return {name: {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}}


def layer_case(name, builtin_layer, tuned_layer, x, repeats):
    """One call of a layer (eval mode): mlx.nn's against hlh_mlx.nn's, which remembers its plan."""
    builtin_layer.eval()
    tuned_layer.eval()
    res = timed({"builtin layer": lambda: builtin_layer(x), "hlh_mlx.nn layer": lambda: tuned_layer(x)}, repeats)
    res["layer over built-in layer"] = res["hlh_mlx.nn layer"] - res["builtin layer"]
    return {name: {k: round(v, 2) for k, v in res.items()}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes: a run on a CPU")
    ap.add_argument("--calls", type=int, default=CALLS, help=f"calls per measurement (default {CALLS})")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per measurement, best kept (default 5)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (default); thread: this thread's CPU time, for a shared machine")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    args = parse_args()
    small, repeats = args.small, args.repeats
    clock[0], calls[0] = CLOCKS[args.clock], args.calls
    rng = np.random.default_rng(0)
    be = backends.auto()
    out = {"device": backends.device(be).name, "backend": be, "mlx": mx.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "calls": args.calls, "repeats": repeats,
           "clock": args.clock}
    qs = {"N": 256, "K": 512, "G": 64} if small else {"N": 14336, "K": 4096, "G": 64}
    x, w, s, b = ops.get("qgemv").make_inputs(qs, mx.float16, rng)
    mx.eval(x, w, s, b)
    out.update(case("quantized_matmul", "qgemv", mx.quantized_matmul, tuned.quantized_matmul, (x, w, s, b),
                    dict(transpose=True, group_size=qs["G"], bits=4), repeats))
    c = 256 if small else 4096
    xr = mx.random.normal((1, 1, c)).astype(mx.float16)
    wr = mx.random.normal((c,)).astype(mx.float16)
    out.update(case("rms_norm", "rms_norm", mx.fast.rms_norm, tuned.rms_norm, (xr, wr, 1e-5), {}, repeats))
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    out.update(case("rope", "rope", mx.fast.rope, tuned.rope, (q, 128),
                    dict(traditional=False, base=500000.0, scale=1.0, offset=100, freqs=None), repeats))
    ql = base_nn.QuantizedLinear(qs["K"], qs["N"], bias=False, group_size=qs["G"], bits=4)
    ql.weight, ql.scales, ql.biases = w, s, b
    out.update(layer_case("QuantizedLinear (one token)", ql, hnn.QuantizedLinear.from_layer(ql), x, repeats))
    norm, hnorm = base_nn.RMSNorm(c), hnn.RMSNorm(c)
    hnorm.weight = norm.weight = wr
    out.update(layer_case("RMSNorm (one token)", norm, hnorm, xr, repeats))
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
