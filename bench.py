"""Benchmark every op at its default shapes on the available backend.

    python bench.py [--backend auto] [--dtype float16] [--budget N] [--out DIR [--force]]

For each op and shape: the built-in's time, the best correct variant and its parameters,
the speedup and the % of roofline, written as markdown and JSON (and a bar chart when
matplotlib is installed). Results come from `hlh_mlx sweep` (stored under variants/, so a
rerun resumes). On the emulator nothing is timed: the report lists correctness only.

Writes: DIR/bench-<device>.json and .md (and .png with matplotlib), DIR by default
benchmarks/results/local/ (ignored by git), plus the sweeps' records in the results store
(variants/<device>/, appended, never rewritten). Existing report files are refused before
any sweep runs, unless --force: the recorded reports under benchmarks/results/ are replaced
only on purpose (--out benchmarks/results --force).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import date
from pathlib import Path

import mlx.core as mx

from hlh_mlx import backends, devices, ops, paths, rank, sweep


def best_rows(op, p, records):
    return summary_rows(op, records, [(s, d) for d in p.dtypes for s in p.shapes], p.backend)


def summary_rows(op, records, cases, backend):
    rows = []
    for shape, dtype in cases:
        table = rank.table_rows(records, op.name, shape, dtype, backend)
        again = {a["variant"]: a["diff_pct"] for a in rank.repeat_agreement(records, shape, dtype, backend)}
        base = next((r for r in table if r["variant"] == "mlx built-in"), None)
        ok = [r for r in table if r["variant"] != "mlx built-in" and r["status"] == "ok"]
        best = ok[0] if ok else None
        rows.append({
            "op": op.name, "shape": op.shape_str(shape), "dtype": dtype,
            "builtin_ms": base and base["median_ms"], "builtin_host_us": base and base["host_us"],
            "best_variant": best and best["variant"], "best_params": best and best["params"],
            "best_ms": best and best["median_ms"], "best_host_us": best and best["host_us"],
            "speedup": best and best["speedup"], "gpu_speedup": best and best["gpu_speedup"],
            "roofline_pct": best and best["roofline_pct"],
            "correct_variants": len(ok), "failed_variants": sum(1 for r in table if r["status"] not in ("ok", "reference")),
            "builtin_again_pct": again.get("mlx built-in"),
            "best_again_pct": again.get(best["variant"].split()[-1]) if best else None,
        })
    return rows


def stored_cases(records, backend):
    """Every (shape, dtype) with a built-in timing in the stored records, newest timing method only."""
    records = rank.newest_method(records)
    seen = []
    for r in records:
        if (r.get("template") == "builtin" and r.get("timing") and r.get("backend") == backend
                and (r["shape"], r["dtype"]) not in seen):
            seen.append((r["shape"], r["dtype"]))
    return records, seen


# the memory-bound suite issue #4 sets its geometric-mean target over (fp16)
SUITE = ("softmax", "rms_norm", "layer_norm", "swiglu", "rope", "gemv", "qgemv")


def targets(rows) -> list[str]:
    """Issue #4's targets, from the largest fp16 shape of each op (the issue's numbers are
    fp16); memory-bound ops outside its suite are listed, not averaged in."""
    largest = {}
    for r in rows:
        if r["dtype"] != "float16":
            continue
        op = ops.get(r["op"])
        size = math.prod(op.parse_shape(r["shape"]).values()) if r["speedup"] else -1
        if r["speedup"] and size > largest.get(r["op"], (-1, None))[0]:
            largest[r["op"]] = (size, r)
    mem = [r for _, r in largest.values() if r["op"] in SUITE]
    others = [r for _, r in largest.values() if r["op"] not in SUITE and ops.get(r["op"]).bound == "memory"]
    out = []
    if mem:
        g = math.exp(sum(math.log(r["speedup"]) for r in mem) / len(mem))
        out.append(f"memory-bound geometric-mean speedup over {len(mem)} ops at their largest shape: {g:.2f}x "
                   f"(target 1.8x: {'met' if g >= 1.8 else f'missed by {1.8 / g:.2f}x'})")
        low = [f"{r['op']} {r['roofline_pct']:.0f}%" for r in mem if (r["roofline_pct"] or 0) < 85]
        out.append("winners below 85% of copy bandwidth: " + (", ".join(low) if low else "none"))
    if others:
        out.append("outside that suite (not averaged in): " + ", ".join(
            f"{r['op']} {r['shape']} {r['speedup']:.2f}x ({r['roofline_pct'] or 0:.0f}% of copy bandwidth)"
            for r in others))
    for name, goal in (("qgemv", 2.5), ("matmul", 0.8)):
        if name in largest:
            s = largest[name][1]["speedup"]
            out.append(f"{name}: {s:.2f}x the built-in (target {goal}x: {'met' if s >= goal else 'missed'})")
    agree = [v for r in rows for v in (r["builtin_again_pct"], r["best_again_pct"]) if v is not None]
    if agree:
        out.append(f"timed twice in one run: {len(agree)} pairs, median {statistics.median(agree):.1f}% apart, "
                   f"max {max(agree):.1f}% ({sum(v <= 3 for v in agree)} within 3%)")
    return out


def markdown(rows, device, backend, when: dict) -> str:
    out = [f"# hlh_mlx bench on {device.name} [{backend}]", "",
           f"measured {when['date']}, MLX {when['mlx']}, command: `python bench.py {' '.join(sys.argv[1:])}`", ""]
    out += ["Times are latencies of one call in a dependent chain (each call consumes the previous call's "
            "output, as in a model) with inputs rotated past the L2; host = microseconds to build one call. "
            "e2e = the built-in's (chain latency + host) in the same run as the variant's / the variant's: what "
            "a program that waits for each op sees, and how variants are ranked and chosen. gpu = chain latency "
            "alone.", ""]
    if when.get("stale"):
        out += [f"Not reported: {when['stale']} stored results of variants whose template changed since they "
                "were measured (kept in variants/ as history; `hlh_mlx.tuned` does not run them).", ""]
    if not device.can_time:
        out += ["The emulator has no speed: this table says which variants are correct, nothing about time.", ""]
    out += ["| op | shape | dtype | built-in ms | host us | best variant | params | best ms | host us | e2e | gpu | "
            "roofline | correct | failed | timed twice |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, k: rank._fmt(v, k)  # noqa: E731
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {f(r['builtin_ms'], 'ms')} | "
                   f"{f(r.get('builtin_host_us'), 'us')} | {r['best_variant'] or '—'} | "
                   f"{r['best_params'] or ''} | {f(r['best_ms'], 'ms')} | {f(r.get('best_host_us'), 'us')} | "
                   f"{f(r['speedup'], 'x')} | {f(r.get('gpu_speedup'), 'x')} | "
                   f"{f(r['roofline_pct'], 'pct')} | {r['correct_variants']} | {r['failed_variants']} | "
                   f"{_again(r)} |")
    t = targets(rows) if device.can_time else []
    if t:
        out += ["", "## Targets", ""] + [f"- {line}" for line in t]
    return "\n".join(out) + "\n"


def _again(r) -> str:
    """'builtin / best' % apart between two timings in one run."""
    parts = [rank._fmt(v, "pct") if v is not None else "—" for v in (r.get("builtin_again_pct"), r.get("best_again_pct"))]
    return " / ".join(parts) if any(p != "—" for p in parts) else "—"


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", action="append", dest="dtypes")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--ops", nargs="*", default=None)
    ap.add_argument("--out", metavar="DIR", type=Path, default=paths.bench_results(),
                    help="folder of the report (default: %(default)s, ignored by git)")
    ap.add_argument("--force", action="store_true", help="overwrite existing report files in --out")
    ap.add_argument("--from-store", metavar="DEVICE", default=None,
                    help="Report what variants/DEVICE/ already holds (e.g. results a GPU machine sent back); run nothing.")
    args = ap.parse_args(argv)
    for name in args.ops or []:
        if name not in ops.names():
            ap.error(f"unknown op {name!r} (one of {', '.join(ops.names())})")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file: give the folder the report goes to")
    try:
        args.slug = args.from_store or backends.device(backends.resolve(args.backend)).slug
        paths.refuse_overwrite(outputs(args), args.force)
    except ValueError as e:
        ap.error(str(e))
    return args


def outputs(args) -> list[Path]:
    """The files this run writes (besides the results store)."""
    stem = args.out / f"bench-{args.slug}"
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]


def main():
    args = parse_args()
    if args.from_store:
        return report_store(args)
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
    if device is None:
        sys.exit("bench: no op could be swept here (see the lines above): nothing to report")
    write(rows, device, backend, args.out, {"mlx": mx.__version__, "date": date.today().isoformat()})


def report_store(args):
    from hlh_mlx import backends, store, tuned
    rows, device, stale = [], None, 0
    dates, versions = set(), set()
    for name in args.ops or ops.names():
        records = store.load(args.from_store, name)
        backend = args.backend if args.backend != "auto" else next((r["backend"] for r in records), None)
        records, cases = stored_cases(records, backend)
        if not cases:
            continue
        # results of variants whose template has changed since (or left the space) are
        # history: hlh_mlx.tuned would not run them, so the report does not claim them
        fresh = [r for r in records if r.get("template") == "builtin" or tuned.variant_of(name, r) is not None]
        stale += len(records) - len(fresh)
        records = fresh
        r0 = records[0]
        device = backends.Device(args.from_store, r0["device_name"], r0["architecture"], backend)
        dates |= {r["date"][:10] for r in records if r.get("timing")}
        versions |= {r["mlx"] for r in records if r.get("timing")}
        rows += summary_rows(ops.get(name), records, [c for c in cases if not args.dtypes or c[1] in args.dtypes],
                             backend)
    if device is None:
        sys.exit(f"no timed results under variants/{args.from_store}/")
    write(rows, device, device.backend, args.out, {"mlx": ", ".join(sorted(versions)),
                                                   "date": ", ".join(sorted(dates)), "stale": stale})


def write(rows, device, backend, out_dir, when: dict):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{device.slug}"
    meta = {"device": device.name, "backend": backend, **when,
            "command": "python bench.py " + " ".join(sys.argv[1:]),
            "ceilings": devices.ceilings(device.slug)}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    text = markdown(rows, device, backend, when)
    stem.with_suffix(".md").write_text(text)
    if plot(rows, stem.with_suffix(".png")):
        print(f"plot: {stem.with_suffix('.png')}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
