"""Kernel durations from an Nsight Compute CSV (`ncu --csv --page raw --metrics
gpu__time_duration.sum ...`): per kernel name, the number of launches and the median,
min and max duration in microseconds. The GPU time of a kernel alone, launch gaps excluded.

    python benchmarks/ncu_durations.py NCU.csv [--out F [--force]]

Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import csv
import json
import statistics
import sys

from hlh_mlx import paths


def durations(path: str) -> dict:
    # the profiled program's own output and ncu's ==PROF== lines share the file: CSV lines are quoted
    lines = [ln for ln in open(path, newline="") if ln.startswith('"')]
    rows = [r for r in csv.DictReader(lines) if r]
    if not rows:
        raise SystemExit(f"{path}: no kernel rows (did ncu profile anything? see its stderr)")
    name_key = next((k for k in rows[0] if k in ("Kernel Name", "Function Name", "Name")), None)
    time_key = next((k for k in rows[0] if k.startswith("gpu__time_duration")), None)
    if name_key is None or time_key is None:
        raise SystemExit(f"{path}: no kernel name or gpu__time_duration column in {list(rows[0])}")
    unit = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "ns": 1e-3, "us": 1.0, "ms": 1e3}
    scale = 1e-3  # ncu's default unit for durations: ns (its second row names the unit)
    by_name: dict = {}
    for r in rows:
        v = r[time_key].replace(",", "")
        if v in unit:  # the units row
            scale = unit[v]
            continue
        try:
            by_name.setdefault(r[name_key], []).append(float(v) * scale)
        except ValueError:
            continue
    return {n: {"launches": len(d), "median_us": round(statistics.median(d), 2), "min_us": round(min(d), 2),
                "max_us": round(max(d), 2)} for n, d in by_name.items()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?", help="ncu's CSV output")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main(argv=None):
    a = parse_args(argv)
    if a.csv is None:
        raise SystemExit("ncu_durations.py: give the CSV that ncu wrote (see the docstring)")
    d = durations(a.csv)
    for n, s in d.items():
        print(f"{s['median_us']:9.2f} us median ({s['min_us']}-{s['max_us']}, {s['launches']} launches)  {n[:100]}")
    if a.out:
        a.out.write_text(json.dumps(d, indent=1))


if __name__ == "__main__":
    sys.exit(main())
