"""On a GPU back end, before trusting any number: the launch plans hlh_mlx.tuned builds
(compiled custom kernels, the built-in's VJP inside the compiled plan) compute what the
built-in computes, under mx.compile and mx.grad too. Prints one line per check; exits 1
on the first failure.

    python benchmarks/runtime_check.py

Writes nothing: one line per check to stdout (kernels it compiles go to the compile cache).
"""

import sys

import mlx.core as mx

from hlh_mlx import backends, ops, runtime, templates, variants


def main():
    be = backends.auto()
    print(f"back end {be} on {backends.device(be).name}, MLX {mx.__version__}")
    op = ops.get("rms_norm")
    t = next(t for t in templates.discover("rms_norm") if t.backend == backends.TEMPLATE_BACKEND[be])
    v = variants.expand(t)[0]
    shape, dtype = {"R": 64, "C": 4096}, "float16"
    launch = backends.Kernel(v, be).launcher(shape, dtype, op.output_shapes(shape), op.output_dtypes(mx.float16))
    x = mx.random.normal((64, 4096)).astype(mx.float16)
    w = mx.random.normal((4096,)).astype(mx.float16)
    ref = mx.fast.rms_norm(x, w, 1e-5)

    def close(a, name):
        err = float(mx.max(mx.abs(a.astype(mx.float32) - ref.astype(mx.float32))).item())
        print(f"{name}: max abs diff {err:.2e}")
        if not err < 2e-2:
            sys.exit(f"FAILED: {name}")

    close(launch(x, w)[0], "raw launch")
    core = runtime.compiled_for(be, lambda x, w: launch(x, w)[0])
    close(core(x, w), f"compiled launch ({'compiled' if be in backends.COMPILABLE else 'not compiled here'})")
    # the full plan path, as hlh_mlx.tuned builds it, with the built-in's gradient inside
    choice = runtime.select.Choice(v, {"shape_str": "64x4096", "dtype": dtype, "device": "?"}, "check")
    call = op.bind(x, w, 1e-5)
    plan = runtime._tuned_plan(op, choice, (x, w, 1e-5), {}, call, mx.fast.rms_norm, True, "rms_norm")
    close(plan(x, w, 1e-5), "tuned plan")
    close(mx.compile(lambda x, w: plan(x, w, 1e-5))(x, w), "tuned plan inside the user's mx.compile"
          + ("" if be in backends.COMPILABLE else " (the built-in runs there on the emulator)"))
    g = mx.grad(lambda x: plan(x, w, 1e-5).astype(mx.float32).sum())(x)
    g_ref = mx.grad(lambda x: mx.fast.rms_norm(x, w, 1e-5).astype(mx.float32).sum())(x)
    gerr = float(mx.max(mx.abs(g.astype(mx.float32) - g_ref.astype(mx.float32))).item())
    print(f"gradient through the plan: max abs diff {gerr:.2e}")
    if not gerr < 1e-2:
        sys.exit("FAILED: gradient")
    print("runtime check passed")


if __name__ == "__main__":
    main()
