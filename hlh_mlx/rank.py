"""Rank stored results against the built-in, and format them as tables."""

from __future__ import annotations

import csv
import io
import json

from . import devices, ops


def newest_method(records) -> list[dict]:
    """Only the records timed by the newest timing method among them: numbers from an
    older method (e.g. one the cache could flatter) are never ranked against newer ones."""
    timed = [r.get("timing_method", 1) for r in records if r.get("timing")]
    if not timed:
        return list(records)
    m = max(timed)
    return [r for r in records if not r.get("timing") or r.get("timing_method", 1) == m]


def _latest(records, shape, dtype, backend):
    """The newest record per variant (and for the built-in) for one shape and dtype."""
    return _latest_with_baselines(records, shape, dtype, backend)[0]


def _latest_with_baselines(records, shape, dtype, backend):
    """The newest record per variant, and for each the built-in time of the same run: the
    built-in record written last before it (a sweep times the built-in before the first
    variant of every run), so a speedup never divides times from two machines or days."""
    keep, base = {}, {}
    last_builtin = None
    mine = [r for r in records if r.get("shape") == shape and r.get("dtype") == dtype and r.get("backend") == backend]
    for r in newest_method(mine):
        if r.get("repeat"):
            continue  # second timings check the first; they are not results of their own
        key = r.get("variant_id") or "builtin"
        keep[key] = r
        if key == "builtin":
            last_builtin = (r.get("timing") or {}).get("median_ms")
        else:
            base[key] = last_builtin
    return keep, base


def baselines(records, shape, dtype, backend) -> dict:
    """variant id -> the built-in's median ms timed in the same run as its newest record."""
    return _latest_with_baselines(records, shape, dtype, backend)[1]


def ranked(records, shape, dtype, backend) -> list[dict]:
    """Correct, timed variants, fastest first."""
    keep = _latest(records, shape, dtype, backend)
    rows = [r for k, r in keep.items() if k != "builtin" and r.get("correct") and r.get("timing")]
    return sorted(rows, key=lambda r: r["timing"]["median_ms"])


def repeat_agreement(records, shape, dtype, backend) -> list[dict]:
    """Variants timed twice in one run (the sweep re-times the winner and the built-in
    after the others): first and second median and how far apart they are."""
    firsts = _latest(records, shape, dtype, backend)
    mine = [r for r in records if r.get("shape") == shape and r.get("dtype") == dtype and r.get("backend") == backend]
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
    keep, run_base = _latest_with_baselines(records, shape, dtype, backend)
    base = keep.get("builtin")
    newest_base_ms = base["timing"]["median_ms"] if base and base.get("timing") else None
    rows = []
    for key, r in keep.items():
        t = r.get("timing") or {}
        ms = t.get("median_ms")
        base_ms = run_base.get(key) or newest_base_ms  # the same run's built-in, when there is one
        rows.append({
            "variant": "mlx built-in" if key == "builtin" else f"{r.get('family')} {key}",
            "params": "" if key == "builtin" else ",".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()),
            "status": r.get("status") if key != "builtin" else "reference",
            "median_ms": ms, "spread": t.get("spread"),
            "speedup": (base_ms / ms) if base_ms and ms else None,
            "roofline_pct": devices.roofline_pct(r.get("device", ""), op, shape, dtype, ms) if ms else None,
            "rel_err": max((c.get("rel_err") or 0) for c in r.get("checks") or [{}]) if r.get("checks") else None,
            "error": r.get("error"),
            "_ok": key == "builtin" or r.get("correct"),
        })
    if base is None:  # the emulator times nothing: the built-in is still the reference
        rows.append({"variant": "mlx built-in", "params": "", "status": "reference", "median_ms": None,
                     "spread": None, "speedup": None, "roofline_pct": None, "rel_err": None, "error": None,
                     "_ok": True})
    rows.sort(key=lambda x: (not x["_ok"], x["median_ms"] is None, x["median_ms"] or 0, x["variant"]))
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
    return str(v)


COLUMNS = [("variant", "variant", None), ("params", "params", None), ("status", "status", None),
           ("median_ms", "median ms", "ms"), ("spread", "spread", "spread"), ("speedup", "vs built-in", "x"),
           ("roofline_pct", "roofline", "pct"), ("rel_err", "rel err", "err")]


def render(rows: list[dict], fmt: str, title: str = "") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[c[0] for c in COLUMNS] + ["error"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
        return buf.getvalue()
    cells = [[_fmt(r.get(k), kind) for k, _, kind in COLUMNS] for r in rows]
    heads = [h for _, h, _ in COLUMNS]
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
