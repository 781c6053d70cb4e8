"""Ranking and roofline arithmetic on hand-made records."""

import pytest

from hlh_mlx import devices, ops, rank

SHAPE = {"R": 8192, "C": 4096}


def rec(vid, ms, correct=True, status="ok"):
    return {"variant_id": vid, "template": "builtin" if vid is None else "softmax/rows.cuda.j2", "family": "rows",
            "params": {} if vid is None else {"BLOCK": 256}, "backend": "cuda", "shape": SHAPE, "dtype": "float16",
            "device": "nvidia-h100-80gb-hbm3", "correct": correct, "status": status,
            "timing": {"median_ms": ms, "spread": 0.01} if ms else None, "checks": [{"rel_err": 1e-6}]}


def test_speedup_and_roofline_against_the_builtin():
    rows = rank.table_rows([rec(None, 0.064), rec("a", 0.032), rec("b", 0.128), rec("c", None, False, "incorrect")],
                           "softmax", SHAPE, "float16", "cuda")
    by = {r["variant"]: r for r in rows}
    assert by["rows a"]["speedup"] == pytest.approx(2.0)
    assert by["rows b"]["speedup"] == pytest.approx(0.5)
    assert by["rows c"]["speedup"] is None and rows[-1]["variant"] == "rows c"  # failures last
    bytes_moved = 2 * 8192 * 4096 * 2
    assert by["rows a"]["roofline_pct"] == pytest.approx(100 * bytes_moved / 0.032e-3 / 1e9 / 2920.0)


def test_ranked_orders_correct_timed_variants_fastest_first():
    out = rank.ranked([rec("b", 0.128), rec("a", 0.032), rec("c", 0.01, False, "incorrect")], SHAPE, "float16", "cuda")
    assert [r["variant_id"] for r in out] == ["a", "b"]


def test_apple_ceilings_by_architecture():
    assert devices.ceilings("applegpu-g13c")["bandwidth_gbs"] == 400
    flops = 2 * 64 ** 3 / 1e-3 / 1e12  # a 64^3 matmul in 1 ms, in TFLOP/s
    assert devices.roofline_pct("applegpu-g16s", ops.get("matmul"), {"M": 64, "N": 64, "K": 64}, "float32", 1.0) \
        == pytest.approx(100 * flops / 6.02)
    for arch in ("g13g", "g13s", "g13c", "g13d", "g14g", "g14s", "g14c", "g14d", "g15g", "g15s", "g15c", "g15d",
                 "g16g", "g16s", "g16c"):  # every M1-M4 tier has a bandwidth and an FP32 rate
        c = devices.ceilings(f"applegpu-{arch}")
        assert c["bandwidth_gbs"] > 0 and c["tflops"]["float32"] > 0
    assert devices.ceilings("some-unknown-gpu") is None


def test_second_timings_are_compared_not_ranked():
    again = dict(rec("a", 0.0336), repeat=True, correct=False)
    base_again = dict(rec(None, 0.064), repeat=True, correct=False)
    records = [rec(None, 0.064), rec("a", 0.032), rec("b", 0.040), again, base_again]
    assert [r["variant_id"] for r in rank.ranked(records, SHAPE, "float16", "cuda")] == ["a", "b"]
    rows = {r["variant"]: r for r in rank.table_rows(records, "softmax", SHAPE, "float16", "cuda")}
    assert rows["rows a"]["median_ms"] == 0.032 and rows["rows a"]["speedup"] == pytest.approx(2.0)
    agree = {a["variant"]: a for a in rank.repeat_agreement(records, SHAPE, "float16", "cuda")}
    assert agree["a"]["diff_pct"] == pytest.approx(5.0)
    assert agree["mlx built-in"]["diff_pct"] == pytest.approx(0.0)
    assert "b" not in agree
    # a later run times the pair again: only its pair is reported, once
    later = records + [rec(None, 0.070), dict(rec(None, 0.077), repeat=True, correct=False)]
    pairs = [a for a in rank.repeat_agreement(later, SHAPE, "float16", "cuda") if a["variant"] == "mlx built-in"]
    assert len(pairs) == 1 and pairs[0]["first_ms"] == 0.070 and pairs[0]["diff_pct"] == pytest.approx(10.0)


def test_only_the_newest_timing_method_is_ranked():
    old = [dict(rec(None, 0.064), timing_method=2), dict(rec("a", 0.020), timing_method=2)]  # cache-flattered
    new = [dict(rec(None, 0.064), timing_method=3), dict(rec("b", 0.040), timing_method=3)]
    rows = rank.table_rows(old + new, "softmax", SHAPE, "float16", "cuda")
    assert [r["variant"] for r in rows] == ["rows b", "mlx built-in"]
    assert [r["variant_id"] for r in rank.ranked(old + new, SHAPE, "float16", "cuda")] == ["b"]


def test_speedups_divide_times_from_the_same_run():
    """A later run re-times the built-in on its machine; variants of the earlier run keep
    the earlier built-in as their baseline."""
    records = [rec(None, 0.064), rec("a", 0.032), rec(None, 0.070), rec("b", 0.040)]
    assert rank.baselines(records, SHAPE, "float16", "cuda") == {"a": 0.064, "b": 0.070}
    rows = {r["variant"]: r for r in rank.table_rows(records, "softmax", SHAPE, "float16", "cuda")}
    assert rows["rows a"]["speedup"] == pytest.approx(2.0) and rows["rows b"]["speedup"] == pytest.approx(1.75)
    assert rows["mlx built-in"]["median_ms"] == 0.070
