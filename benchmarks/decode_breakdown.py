"""Where one decode step's time goes, unpatched and patched: Python graph building, MLX's
encoding of the graph (`mx.async_eval` returns once every node is encoded and queued) and the
GPU, on an mlx-lm model built from a published config (random weights).

    python benchmarks/decode_breakdown.py [--model llama-3-8b] [--bits 4] [--layers 8] [--json F]

Per step, averaged over --steps decode steps after a warm-up:
  build_us   the model call: Python, mlx-lm and hlh_mlx code making the graph
  encode_us  mx.async_eval: MLX evaluating the graph's nodes into GPU work (CPU time)
  wait_us    mx.eval afterwards: waiting for the GPU to finish
  step_us    all three, one step at a time (no overlap)
  pipelined_us  per step when the next step is built while the GPU runs this one (mlx-lm's loop)
Also: the encode cost per node of a chain of custom kernels against built-ins, with short and
long kernel sources, to tell a per-custom-kernel cost in MLX from one in hlh_mlx.
Writes nothing unless --out FILE is given (an existing FILE is refused without --force).
"""

import argparse
import json
import time

import mlx.core as mx

from hlh_mlx import models, patching, paths, runtime


def warm_decode(model, prompt_len: int = 64, steps: int = 5):
    """(cache, token): a prompt prefilled and `steps` decode steps run (kernels built, plans
    decided), ready for the next decode step."""
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * prompt_len]), cache=cache))
    tok = mx.array([[2]])
    for _ in range(steps):
        mx.eval(model(tok, cache=cache))
    return cache, tok


def step_breakdown(model, steps: int, prompt_len: int = 64) -> dict:
    cache, tok = warm_decode(model, prompt_len)
    build = encode = wait = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        build, encode, wait = build + t1 - t0, encode + t2 - t1, wait + t3 - t2
    # pipelined: build and encode step n+1 before waiting for step n
    out = model(tok, cache=cache)
    mx.async_eval(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(tok, cache=cache)
        mx.async_eval(nxt)
        mx.eval(out)
        out = nxt
    mx.eval(out)
    pipelined = (time.perf_counter() - t0) / steps
    n = steps
    return {"build_us": 1e6 * build / n, "encode_us": 1e6 * encode / n, "wait_us": 1e6 * wait / n,
            "step_us": 1e6 * (build + encode + wait) / n, "pipelined_us": 1e6 * pipelined}


def build_profile(model, steps: int, top: int, prompt_len: int = 64) -> str:
    """cProfile of building `steps` decode steps (the model call only, no evaluation): which
    Python functions the build time goes to, by own time."""
    import cProfile
    import io
    import pstats
    cache, tok = warm_decode(model, prompt_len)
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        out = model(tok, cache=cache)
        prof.disable()
        mx.eval(out)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def node_cost(n: int = 200) -> dict:
    """Host time per node of a chain of n ops (build, encode, GPU wait): a built-in add; a
    custom kernel with a short source, with a 6 KB source (comments), with 8 inputs; and the
    decode shape's 4-bit gemv (4096x4096, group 64), built-in against hlh_mlx.tuned."""
    x = mx.zeros((1024,), dtype=mx.float16)
    mx.eval(x)
    body = "unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i < a_shape[0]) b[i] = a[i] + (T)1;"
    more = [mx.zeros((16,), dtype=mx.float16) for _ in range(7)]
    mx.eval(more)
    is_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available() if hasattr(mx, "cuda") else False
    steps = {"builtin": (x, lambda y: y + 1)}
    if is_cuda:
        launch = dict(template=[("T", mx.float16)], grid=(1024, 1, 1), threadgroup=(256, 1, 1))
        for name, src, extra in (("short", body, []), ("long", "// " + "x" * 6000 + "\n" + body, []),
                                 ("inputs8", body, more)):
            k = mx.fast.cuda_kernel(name=f"hlh_cost_{name}", input_names=["a"] + [f"c{i}" for i in range(len(extra))],
                                    output_names=["b"], source=src)
            steps[name] = (x, (lambda k, extra: lambda y: k(inputs=[y, *extra], output_shapes=[y.shape],
                                                              output_dtypes=[y.dtype], **launch)[0])(k, extra))
        from hlh_mlx import tuned
        w = mx.random.normal((4096, 4096)).astype(mx.float16)
        wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
        v = mx.random.normal((1, 4096)).astype(mx.float16)
        mx.eval(wq, sc, bi, v)
        kw = dict(transpose=True, group_size=64, bits=4)
        steps["qgemv_builtin"] = (v, lambda y: mx.quantized_matmul(y, wq, sc, bi, **kw))
        steps["qgemv_tuned"] = (v, lambda y: tuned.quantized_matmul(y, wq, sc, bi, **kw))
    out = {}
    for name, (start, step) in steps.items():
        def chain():
            y = start
            for _ in range(n):
                y = step(y)
            return y
        mx.eval(chain())  # warm-up
        best = None
        for _ in range(5):
            t0 = time.perf_counter()
            y = chain()
            t1 = time.perf_counter()
            mx.async_eval(y)
            t2 = time.perf_counter()
            mx.eval(y)
            t3 = time.perf_counter()
            r = (1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / n, 1e6 * (t3 - t2) / n)
            best = r if best is None or r[1] < best[1] else best
        out[name] = {"build_us_per_node": best[0], "encode_us_per_node": best[1], "wait_us_per_node": best[2]}
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N Python functions with the most own time in building a step")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    result = {"mlx": mx.__version__, "device": str(mx.default_device()), "date": time.strftime("%Y-%m-%d"),
              "model": a.model, "bits": a.bits, "layers": a.layers, "node_cost": node_cost()}
    print(json.dumps(result["node_cost"], indent=1))
    model, _ = models.load(a.model, bits=a.bits, layers=a.layers)
    from hlh_mlx.validate import compiled_blocks
    for stream_name in ("default", "new"):
        ctx = mx.stream(mx.new_thread_local_stream(mx.default_device())) if stream_name == "new" else mx.stream(mx.default_stream(mx.default_device()))
        with ctx:
            result[f"unpatched_{stream_name}"] = step_breakdown(model, a.steps)
            print(f"unpatched {stream_name}", json.dumps(result[f"unpatched_{stream_name}"]))
            with compiled_blocks(model):
                result[f"unpatched_blocks_{stream_name}"] = step_breakdown(model, a.steps)
                print(f"unpatched+blocks {stream_name}", json.dumps(result[f"unpatched_blocks_{stream_name}"]))
    if a.profile:
        result["profile_unpatched"] = build_profile(model, a.steps, a.profile)
        print(result["profile_unpatched"])
    result["patch"] = patching.patch(model).as_dict()
    if a.profile:
        result["profile_patched"] = build_profile(model, a.steps, a.profile)
        print(result["profile_patched"])
    for stream_name in ("default", "new"):
        ctx = mx.stream(mx.new_thread_local_stream(mx.default_device())) if stream_name == "new" else mx.stream(mx.default_stream(mx.default_device()))
        with ctx:
            result[f"patched_{stream_name}"] = step_breakdown(model, a.steps)
            print(f"patched {stream_name}", json.dumps(result[f"patched_{stream_name}"]))
    # distinct calls that ran the built-in (runtime.fallbacks() counts each once, not each
    # call; an op no variant serves at any shape only its first call: no recording block here)
    result["fallbacks"] = {f"{op}: {why}": c for (op, why), c in runtime.fallbacks().items()}
    for k, v in result["fallbacks"].items():
        print(f"fallback, {v} distinct call(s): {k[:120]}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
