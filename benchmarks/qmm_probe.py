"""How fast MLX's 4-bit quantized_matmul is at prompt sizes, beside dequantizing the weight
first and multiplying with MLX's fp16 matmul (cuBLAS), and beside the fp16 matmul alone (the
weight already fp16: a lower bound). Latency in a dependent chain (`timing.measure`, inputs
and weights rotated through 2 GB), Llama-3-8B's projection shapes, group 64.

    python benchmarks/qmm_probe.py [--rows 1,16,64,128,511] [--out F [--force]]

Writes a table to stdout; the JSON to F only when --out F is given.
"""

import argparse
import datetime
import json

import mlx.core as mx

from hlh_mlx import paths, timing

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def cases(m: int, n: int, k: int, g: int, dtype):
    def quantized():
        w = mx.random.normal((n, k)).astype(dtype) * k ** -0.5
        wq, s, b = mx.quantize(w, group_size=g, bits=4)
        return [mx.random.normal((m, k)).astype(dtype), wq, s, b]

    def dense():
        return [mx.random.normal((m, k)).astype(dtype), (mx.random.normal((n, k)) * k ** -0.5).astype(dtype)]

    return {
        "quantized_matmul": (lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=g, bits=4),
                             quantized),
        "dequantize+matmul": (lambda x, w, s, b: x @ mx.dequantize(w, s, b, group_size=g, bits=4).T, quantized),
        "fp16 matmul": (lambda x, w: x @ w.T, dense),
    }


outputs = paths.given_output  # the files this run writes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,128,256,511")
    ap.add_argument("--group", type=int, default=64)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


def main(argv=None):
    args = parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    result = {"device": str(mx.default_device()), "mlx": mx.__version__, "group": args.group,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "cases": []}
    print(f"{'rows':>5s} {'proj':8s} {'quantized_matmul':>17s} {'dequant+matmul':>15s} {'fp16 matmul':>12s}  (ms, chain)")
    for m in rows:
        for name, (n, k) in SHAPES.items():
            got = {label: timing.chain_ms(fn, make()) for label, (fn, make) in cases(m, n, k, args.group, mx.float16).items()}
            result["cases"].append({"rows": m, "proj": name, "N": n, "K": k, **got})
            print(f"{m:5d} {name:8s} {got['quantized_matmul']:17.4f} {got['dequantize+matmul']:15.4f} "
                  f"{got['fp16 matmul']:12.4f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
