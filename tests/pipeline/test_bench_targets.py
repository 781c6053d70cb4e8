"""bench.py's target lines: the geometric mean covers issue #4's fp16 suite at each op's
largest shape; other ops and dtypes are reported, never averaged in."""

import importlib.util

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(op, shape, speedup, roofline, dtype="float16"):
    return {"op": op, "shape": shape, "dtype": dtype, "speedup": speedup, "roofline_pct": roofline,
            "builtin_again_pct": None, "best_again_pct": None}


def test_geomean_is_over_the_suite_at_the_largest_fp16_shape(bench):
    rows = [row("softmax", "1x4096", 9.0, 5), row("softmax", "8192x4096", 2.0, 90),
            row("rope", "32x4096x128x0", 2.0, 80),
            row("rope", "32x4096x128x0", 50.0, 99, dtype="bfloat16"),   # not fp16: not averaged
            row("decode_attention", "32x8x4096x128", 50.0, 99)]         # outside the suite
    lines = bench.targets(rows)
    assert lines[0] == "memory-bound geometric-mean speedup over 2 ops at their largest shape: 2.00x (target 1.8x: met)"
    assert lines[1] == "winners below 85% of copy bandwidth: rope 80%"
    assert lines[2].startswith("outside that suite (not averaged in): decode_attention 32x8x4096x128 50.00x")


def test_missed_targets_say_by_how_much(bench):
    lines = bench.targets([row("gemv", "1x4096x4096", 1.0, 99), row("qgemv", "14336x4096x64", 2.0, 70),
                           row("matmul", "4096x4096x4096", 0.5, 40)])
    assert "1.41x (target 1.8x: missed by 1.27x)" in lines[0]
    assert "qgemv: 2.00x the built-in (target 2.5x: missed)" in lines
    assert "matmul: 0.50x the built-in (target 0.8x: missed)" in lines
