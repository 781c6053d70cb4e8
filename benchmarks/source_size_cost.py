"""What the length of a custom kernel's source costs on the host, per call.

    python benchmarks/source_size_cost.py [--calls N] [--repeats R] [--out F [--force]]

MLX's CUDA back end copies a custom kernel's body into a new source string at every graph
build and hashes the whole source at every evaluation (the name of its JIT module), so a
long body costs host time at each call, not once. This times one small copy kernel whose
body is padded with N KB of `//` comment lines (0, 4, 8, 16 KB), per call: graph building
alone, and building plus `mx.async_eval` (which returns once the node is encoded). The
slope is the host cost per KB of source. The same bodies are also timed as a one-line
source that #includes them from a file (NVRTC reads the file once, at compile time).
Beside it: the rendered and the compacted (`cuda_source.compact`, what hlh_mlx hands to
MLX) source lengths of every CUDA template's first variant, so the saving per call can be
read off.

Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from hlh_mlx import backends, cuda_source, paths, templates, variants

BODY = """
unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
if (i < x_shape[0]) { out[i] = x[i]; }
"""
PAD_KB = (0, 4, 8, 16)


def body(pad_kb: int) -> str:
    line = "// " + "x" * 76 + "\n"  # 80 characters a line, as a commented template reads
    return line * (pad_kb * 1024 // len(line)) + BODY


def kernel(pad_kb: int, include_dir=None):
    """The padded body as the kernel's source, or (include_dir given) written to a file there
    and pulled in by an #include line: what MLX copies and hashes per call is then one line."""
    text = body(pad_kb)
    if include_dir is not None:
        path = include_dir / f"pad{pad_kb}.cuh"
        path.write_text(text)
        text = f'#include "{path}"\n// x_shape\n'  # the comment: MLX passes x_shape if the source names it
    return mx.fast.cuda_kernel(name=f"{'inc' if include_dir else 'pad'}{pad_kb}", input_names=["x"],
                               output_names=["out"], source=text)


def per_call_us(fns: dict, calls: int, repeats: int, encode: bool) -> dict:
    """{name: best thread-CPU microseconds per call}, the kernels alternated within a repeat."""
    x = mx.ones((256,), mx.float32)
    mx.eval(x)
    kw = dict(grid=(256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(256,)], output_dtypes=[mx.float32])
    for name, k in fns.items():
        y = k(inputs=[x], **kw)[0]  # compiled once, outside the clock
        if not mx.array_equal(y, x).item():
            raise SystemExit(f"kernel {name} did not copy its input")
    best = {n: float("inf") for n in fns}
    for _ in range(repeats):
        for name, k in fns.items():
            outs = []
            t0 = time.thread_time()
            for _ in range(calls):
                y = k(inputs=[x], **kw)[0]
                if encode:
                    mx.async_eval(y)
                outs.append(y)
            dt = time.thread_time() - t0
            mx.eval(outs)
            best[name] = min(best[name], dt / calls * 1e6)
    return best


def template_sizes() -> list:
    rows = []
    for t in templates.discover():
        if t.backend != "cuda":
            continue
        r = variants.expand(t)[0].rendered
        rows.append({"template": t.relpath, "rendered_chars": len(r.source) + len(r.header),
                     "compact_chars": len(cuda_source.compact(r.source)) + len(cuda_source.compact(r.header))})
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    a = parse_args()
    if backends.auto() != "cuda":
        raise SystemExit("source_size_cost.py times MLX's CUDA back end: run it on an NVIDIA GPU")
    inc_dir = Path(tempfile.mkdtemp(prefix="hlh-include-"))
    fns = {kb: kernel(kb) for kb in PAD_KB} | {f"inc{kb}": kernel(kb, inc_dir) for kb in PAD_KB}
    build = per_call_us(fns, a.calls, a.repeats, encode=False)
    encode = per_call_us(fns, a.calls, a.repeats, encode=True)
    slope = {k: float(np.polyfit(PAD_KB, [d[kb] for kb in PAD_KB], 1)[0]) for k, d in (("build", build), ("build_encode", encode))}
    dev = backends.device("cuda")
    res = {"device": dev.name, "mlx": mx.__version__, "date": datetime.date.today().isoformat(),
           "calls": a.calls, "repeats": a.repeats, "clock": "thread CPU time, best repeat",
           "build_us": {str(k): v for k, v in build.items()}, "build_encode_us": {str(k): v for k, v in encode.items()},
           "us_per_kb": slope, "templates": template_sizes()}
    print(f"{dev.name}, MLX {mx.__version__}: host us per call of a copy kernel padded with N KB of comments")
    print("pad KB  build  build+encode")
    for kb in PAD_KB:
        print(f"{kb:6d} {build[kb]:6.2f} {encode[kb]:8.2f}   #include: {build[f'inc{kb}']:6.2f} {encode[f'inc{kb}']:8.2f}")
    print(f"per KB: build {slope['build']:.3f} us, build+encode {slope['build_encode']:.3f} us")
    for r in res["templates"]:
        saved = (r["rendered_chars"] - r["compact_chars"]) / 1024 * slope["build_encode"]
        print(f"{r['template']:40s} {r['rendered_chars']:6d} -> {r['compact_chars']:6d} chars (~{saved:.2f} us a call)")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
