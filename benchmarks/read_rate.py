"""Sanity check of the timing method on a GPU: how fast can one stream a large fp16 matrix,
timed exactly as the sweep times kernels, with 1, 2 and 8 rotating copies?

    python benchmarks/read_rate.py            # prints GB/s per case, JSON on the last line

Writes nothing: the results go to stdout (redirect them to keep them).

A read rate above the memory's datasheet peak means the cache kept part of the data
between calls: the number is not a DRAM number.
"""

import json

import mlx.core as mx

from hlh_mlx import timing


def main():
    out = {}
    for n, k in ((4096, 14336), (14336, 4096)):
        for sets_n in (1, 2, 8):
            sets = [[mx.random.normal((n, k)).astype(mx.float16), mx.random.normal((1, k)).astype(mx.float16)]
                    for _ in range(sets_n)]
            mx.eval(sets)
            nbytes = n * k * 2
            for name, fn in (("sum", lambda w, x: mx.sum(w, axis=1)), ("x@w.T", lambda w, x: x @ w.T)):
                t = timing.measure(fn, sets, cache_resident=False)
                gbs = nbytes / (t.median_ms * 1e-3) / 1e9
                out[f"{name} {n}x{k} sets={sets_n}"] = round(gbs, 1)
                print(f"{name:6s} {n}x{k} sets={sets_n}: {t.median_ms:.4f} ms, {gbs:.0f} GB/s (spread {t.spread:.1%})")
            del sets
    print(json.dumps(out))


if __name__ == "__main__":
    main()
