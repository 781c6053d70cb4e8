"""The sweep's worker process: builds, checks and times one variant per request.

It runs apart from the sweep so that a variant that crashes the process or hangs the
GPU costs only that variant: the sweep records it and starts a new worker. Protocol:
one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np


_TIMING_INPUTS: dict = {}


def _timing_inputs(op, shape, dtype):
    """Input sets for timing one (op, shape, dtype): made once per worker and shared by the
    built-in and every variant, so all are timed on the same data (checks draw fresh ones)."""
    import mlx.core as mx

    from . import timing
    from .ops.spec import DTYPES

    key = (op.name, tuple(sorted(shape.items())), dtype)
    if key not in _TIMING_INPUTS:
        _TIMING_INPUTS.clear()  # one shape at a time: keep device memory bounded
        dt = DTYPES[dtype]
        rng = np.random.default_rng(0)
        first = op.make_inputs(shape, dt, rng)
        nbytes = sum(x.nbytes for x in first)
        sets, resident = timing.input_sets(lambda: op.make_inputs(shape, dt, rng), nbytes)
        mx.eval(sets)
        _TIMING_INPUTS[key] = (sets, resident)
    return _TIMING_INPUTS[key]


def _time(op, fn_for_inputs, shape, dtype):
    from . import config, timing

    sets, resident = _timing_inputs(op, shape, dtype)
    return timing.measure_all(fn_for_inputs, sets, cache_resident=resident,
                              throughput=config.get("HLH_MLX_THROUGHPUT")).to_dict()


def handle(req: dict) -> dict:
    from . import backends, check, ops, templates, variants
    from .ops.spec import DTYPES

    if req["kind"] == "ping":  # a warm-up: the modules above are loaded
        return {"status": "ok"}

    op = ops.get(req["op"])
    dtype = req["dtype"]
    shape = req.get("time_shape")
    if req["kind"] == "builtin":
        return {"status": "ok", "timing": _time(op, op.baseline_for(shape), shape, dtype), **_device(req)}

    # the emulator is for proving kernels: sanitize unless the user said HLH_MLX_SANITIZE=0
    # (or the request says, as `check --no-sanitize` does)
    sanitize = None
    if req["backend"] == "emulator":
        sanitize = req["sanitize"] if req.get("sanitize") is not None else \
            os.environ.get("HLH_MLX_SANITIZE", "1") != "0"
    template = templates.load(req["template"])
    variant = variants.make(template, req["params"])
    # the inputs' seed goes back into the record: which inputs proved it, and no two records alike
    reply: dict = {"status": "ok", "checks": [], "source_hash": variant.source_hash, "seed": req.get("seed")}
    try:
        kernel = backends.Kernel(variant, req["backend"], sanitize=sanitize)
        if req.get("repeat"):  # a second timing of a variant this run already proved
            results, failure = [], None
        else:
            results, failure = check.check_shapes(kernel, op, variant, req["check_shapes"], dtype,
                                                  np.random.default_rng(req["seed"]),
                                                  repeat=req["backend"] in backends.CHECKED_TWICE)
        reply["checks"] = [r.to_dict() for r in results]
        if failure:
            reply["status"] = "incorrect"
            reply["error"] = failure
            return reply
    except Exception as e:  # a variant that fails to build or run is a result, not a crash
        reply["status"] = "compile_error" if "compile" in type(e).__name__.lower() else "error"
        reply["error"] = backends.map_compile_error(e, variant)
        return reply
    if shape is not None and req.get("time"):
        from .runtime import compiled_for, dispatched
        # timed as hlh_mlx.tuned runs it (runtime.dispatched: the op's compiled function
        # where the back end replays custom kernels, else the signature looked up), the
        # launch worked out once, so the host cost stored is the one users pay
        launch = op.finished(kernel.launcher(shape, dtype, op.kernel_shapes(shape), op.output_dtypes(DTYPES[dtype])))
        reply["timing"] = _time(op, dispatched(compiled_for(req["backend"], launch)), shape, dtype)
        reply.update(_device(req))
    return reply


def _device(req: dict) -> dict:
    """The device this worker timed on, so a sweep never ranks timings of two kinds of
    device together (a worker pinned to another GPU model, a Ray node of another kind)."""
    if not req.get("backend"):
        return {}
    from . import backends
    return {"device": backends.device(req["backend"]).slug}


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(json.loads(line))
        except Exception as e:
            reply = {"status": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
