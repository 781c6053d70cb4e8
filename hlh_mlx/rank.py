"""Rank stored results against the built-in, and format them as tables.

Variants are ranked by what a program pays per call: latency in a dependent chain plus
host time (`timing.end_to_end_ms`); the selection rule itself lives in `select`."""

from __future__ import annotations

import csv
import io
import json

from . import devices, ops
from .select import clears_the_bar, latest_with_baselines, newest_method, ratio, records_at, run_noise
from .timing import end_to_end_ms


def _latest(records, shape, dtype, backend):
    """The newest record per variant (and for the built-in) for one shape and dtype."""
    return latest_with_baselines(records, shape, dtype, backend)[0]


def baselines(records, shape, dtype, backend) -> dict:
    """variant id -> the built-in's median ms timed in the same run as its newest record."""
    base = latest_with_baselines(records, shape, dtype, backend)[1]
    return {k: ((b or {}).get("timing") or {}).get("median_ms") for k, b in base.items()}


def ranked(records, shape, dtype, backend) -> list[dict]:
    """Correct, timed variants, cheapest end to end first."""
    keep = _latest(records, shape, dtype, backend)
    rows = [r for k, r in keep.items() if k != "builtin" and r.get("correct") and r.get("timing")]
    return sorted(rows, key=lambda r: end_to_end_ms(r["timing"]))


def repeat_agreement(records, shape, dtype, backend) -> list[dict]:
    """Variants timed twice in one run (the sweep re-times the winner and the built-in
    after the others): first and second median and how far apart they are."""
    firsts = _latest(records, shape, dtype, backend)
    mine = records_at(records, shape, dtype, backend)
    seconds = {}  # the newest second timing per variant: the one taken after the newest first
    for r in newest_method(mine):
        if r.get("repeat") and r.get("timing"):
            seconds[r.get("variant_id") or "builtin"] = r
    out = []
    for key, r in seconds.items():
        first = firsts.get(key)
        if first and first.get("timing"):
            a, b = first["timing"]["median_ms"], r["timing"]["median_ms"]
            out.append({"variant": "mlx built-in" if key == "builtin" else key, "first_ms": a, "second_ms": b,
                        "diff_pct": 100 * abs(b - a) / a})
    return out


def table_rows(records, op_name, shape, dtype, backend, top=None) -> list[dict]:
    """Rows of the ranked table: every variant (failures last) and the built-in."""
    op = ops.get(op_name)
    keep, run_base = latest_with_baselines(records, shape, dtype, backend)
    base = keep.get("builtin")
    mine = records_at(records, shape, dtype, backend)
    noise = run_noise(newest_method(mine))
    rows = []
    for key, r in keep.items():
        t = r.get("timing") or {}
        ms = t.get("median_ms")
        b = run_base.get(key) or base  # the same run's built-in, when there is one
        x = ratio(t, (b or {}).get("timing"))
        rows.append({
            "variant": "mlx built-in" if key == "builtin" else f"{r.get('family')} {key}",
            "params": "" if key == "builtin" else ",".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()),
            "status": r.get("status") if key != "builtin" else "reference",
            "median_ms": ms, "spread": t.get("spread"), "host_us": t.get("host_us"),
            "throughput_ms": t.get("throughput_ms"),
            "gpu_speedup": x["gpu"], "speedup": x["end_to_end"],
            # whether the selection rule would use it here (`select`): None for the built-in,
            # and where nothing was timed
            "clears": (None if key == "builtin" or not ms or not r.get("correct") else
                       "yes" if clears_the_bar(t, (b or {}).get("timing"), noise.get(id(run_base.get(key)), 0.0))
                       else "no"),
            "roofline_pct": devices.roofline_pct(r.get("device", ""), op, shape, dtype, ms) if ms else None,
            "rel_err": max((c.get("rel_err") or 0) for c in r.get("checks") or [{}]) if r.get("checks") else None,
            "checked": len(r.get("checks") or []) if key != "builtin" else None,
            "error": r.get("error"),
            "_ok": key == "builtin" or r.get("correct"),
        })
    if base is None:  # the emulator times nothing: the built-in is still the reference
        rows.append({"variant": "mlx built-in", "params": "", "status": "reference", "median_ms": None,
                     "spread": None, "host_us": None, "throughput_ms": None, "gpu_speedup": None, "speedup": None,
                     "clears": None,
                     "roofline_pct": None, "rel_err": None, "checked": None, "error": None, "_ok": True})
    rows.sort(key=lambda x: (not x["_ok"], x["median_ms"] is None,
                             (x["median_ms"] or 0) + (x["host_us"] or 0) / 1e3, x["variant"]))
    if top:
        kept = [x for x in rows if x["_ok"] and x["variant"] != "mlx built-in"][:top]
        rows = kept + [x for x in rows if x["variant"] == "mlx built-in"] + [x for x in rows if not x["_ok"]]
    for x in rows:
        x.pop("_ok")
    return rows


def _fmt(v, kind):
    if v is None:
        return "—"
    if kind == "ms":
        return f"{v:.4f}" if v < 1 else f"{v:.3f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "pct":
        return f"{v:.1f}%"
    if kind == "err":
        return f"{v:.1e}"
    if kind == "spread":
        return f"±{100 * v:.1f}%"
    if kind == "us":
        return f"{v:.1f}"
    return str(v)


# "chain ms": latency of one call in a dependent chain (each call waits for the one before,
# as in a model); "host us": building one call on the host; "e2e vs built-in": built-in
# over variant of chain latency + host time, what the program sees (the ranking); "gpu vs
# built-in": chain latency alone; "usable": whether the selection rule may take it here (a
# win beyond both timings' spread and its run's own re-timing; the best usable one runs);
# "batch ms": independent calls (throughput), when measured.
COLUMNS = [("variant", "variant", None), ("params", "params", None), ("status", "status", None),
           ("median_ms", "chain ms", "ms"), ("spread", "spread", "spread"), ("host_us", "host us", "us"),
           ("speedup", "e2e vs built-in", "x"), ("gpu_speedup", "gpu vs built-in", "x"), ("clears", "usable", None),
           ("throughput_ms", "batch ms", "ms"), ("roofline_pct", "roofline", "pct"), ("rel_err", "rel err", "err")]


# On the emulator nothing is timed: the table says what was proved, not how fast.
CHECK_COLUMNS = [("variant", "variant", None), ("params", "params", None), ("status", "status", None),
                 ("checked", "shapes checked", None), ("rel_err", "worst rel err", "err")]


def columns_for(rows: list[dict]) -> list:
    """The timing table where anything was timed, else what was proved (the emulator)."""
    return COLUMNS if any(r.get("median_ms") is not None for r in rows) else CHECK_COLUMNS


def render(rows: list[dict], fmt: str, title: str = "", columns=None) -> str:
    cols = columns or COLUMNS
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[c[0] for c in cols] + ["error"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
        return buf.getvalue()
    cells = [[_fmt(r.get(k), kind) for k, _, kind in cols] for r in rows]
    heads = [h for _, h, _ in cols]
    if fmt == "md":
        out = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(heads) + " |",
                                                         "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = ([title] if title else []) + [line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells]
    for r in rows:
        if r.get("error"):
            out.append(f"  {r['variant']}: {r['error']}")
    return "\n".join(out)
