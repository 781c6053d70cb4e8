"""Benchmark every op at its default shapes on the available backend.

    python bench.py [--backend auto] [--dtype float16] [--budget N] [--out benchmarks/results]

For each op and shape: the built-in's time, the best correct variant and its parameters,
the speedup and the % of roofline, written as markdown and JSON (and a bar chart when
matplotlib is installed). Results come from `hlh_mlx sweep` (stored under variants/, so a
rerun resumes). On the emulator nothing is timed: the report lists correctness only.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import mlx.core as mx

from hlh_mlx import devices, ops, rank, sweep


def best_rows(op, p, records):
    rows = []
    for dtype in p.dtypes:
        for shape in p.shapes:
            table = rank.table_rows(records, op.name, shape, dtype, p.backend)
            base = next((r for r in table if r["variant"] == "mlx built-in"), None)
            ok = [r for r in table if r["variant"] != "mlx built-in" and r["status"] == "ok"]
            best = ok[0] if ok else None
            rows.append({
                "op": op.name, "shape": op.shape_str(shape), "dtype": dtype,
                "builtin_ms": base and base["median_ms"],
                "best_variant": best and best["variant"], "best_params": best and best["params"],
                "best_ms": best and best["median_ms"], "speedup": best and best["speedup"],
                "roofline_pct": best and best["roofline_pct"],
                "correct_variants": len(ok), "failed_variants": sum(1 for r in table if r["status"] not in ("ok", "reference")),
            })
    return rows


def markdown(rows, device, backend) -> str:
    out = [f"# hlh_mlx bench on {device.name} [{backend}]", "",
           f"{date.today().isoformat()}, MLX {mx.__version__}, command: `python bench.py {' '.join(sys.argv[1:])}`", ""]
    if not device.can_time:
        out += ["The emulator has no speed: this table says which variants are correct, nothing about time.", ""]
    out += ["| op | shape | dtype | built-in ms | best variant | params | best ms | speedup | roofline | correct | failed |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, k: rank._fmt(v, k)  # noqa: E731
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {f(r['builtin_ms'], 'ms')} | {r['best_variant'] or '—'} | "
                   f"{r['best_params'] or ''} | {f(r['best_ms'], 'ms')} | {f(r['speedup'], 'x')} | "
                   f"{f(r['roofline_pct'], 'pct')} | {r['correct_variants']} | {r['failed_variants']} |")
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r["speedup"]]
    if not timed:
        return False
    fig, ax = plt.subplots(figsize=(max(4, len(timed)), 3))
    ax.bar([f"{r['op']}\n{r['shape']}\n{r['dtype']}" for r in timed], [r["speedup"] for r in timed])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speedup vs MLX built-in")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", action="append", dest="dtypes")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--ops", nargs="*", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows, device, backend = [], None, None
    for name in args.ops or ops.names():
        op = ops.get(name)
        try:
            p = sweep.plan(name, dtypes=args.dtypes or ["float16" if name == "matmul" else "float32"],
                           backend=args.backend, budget=args.budget)
        except ValueError as e:  # e.g. an op with CUDA templates only, on the emulator
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        device, backend = p.device, p.backend
        print(f"{name}: {len(p.candidates)} variants on {p.device.name} [{p.backend}]", file=sys.stderr)
        rows += best_rows(op, p, sweep.run(p))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{device.slug}"
    meta = {"device": device.name, "backend": backend, "mlx": mx.__version__, "date": date.today().isoformat(),
            "command": "python bench.py " + " ".join(sys.argv[1:]),
            "ceilings": devices.ceilings(device.slug)}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    text = markdown(rows, device, backend)
    stem.with_suffix(".md").write_text(text)
    if plot(rows, stem.with_suffix(".png")):
        print(f"plot: {stem.with_suffix('.png')}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
