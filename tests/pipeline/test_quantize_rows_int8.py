"""quantize_rows_int8: the MLX composition rounds half to even and handles an all-zero row;
the rows.metal kernel, called through hlh_mlx.tuned (a made-up timing record in a temporary
store makes it win; the emulator times nothing), matches the composition exactly in q and
scale for every dtype; with nothing tuned the built-in runs with a reason; an exported
variant runs on the emulator and returns both outputs with their dtypes."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import store, templates, timing, tuned, variants
from hlh_mlx.ops.quantize_rows_int8 import quantize_rows_int8

from .conftest import ROOT

OP = "quantize_rows_int8"


def rows_variants(**want):
    t = next(t for t in templates.discover(OP) if t.family == "rows" and t.backend == "metal")
    return [v for v in variants.expand(t) if all(v.param_dict[k] == x for k, x in want.items())]


def make_winner(store_dir, v, dtype, shape={"R": 8, "C": 512}):
    path = store_dir / "emulator" / f"{OP}.jsonl"
    common = {"op": OP, "device": "emulator", "backend": "emulator", "shape": shape, "dtype": dtype,
              "shape_str": "x".join(str(x) for x in shape.values()), "mlx": mx.__version__, "status": "ok",
              "timing_method": timing.METHOD}
    store.append(path, {**common, "variant_id": None, "template": "builtin", "correct": True,
                        "timing": {"median_ms": 1.0}})
    store.append(path, {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict,
                        "source_hash": v.source_hash, "correct": True, "timing": {"median_ms": 0.5}})


def awkward(rng, lead, c, dtype):
    """Random rows, an all-zero row, and a row of .5 ties (max |x| = 127, so scale = 1)."""
    x = rng.standard_normal((*lead, c)).astype(np.float32) * 3
    flat = x.reshape(-1, c)
    flat[0] = 0.0
    flat[1] = rng.integers(-254, 255, size=c) / 2
    flat[1, c // 2] = -127.0
    flat[2, :4] = [1000.0, 0.0, -1000.0, 3.9370079]  # extremes at +-127, a zero
    return mx.array(x).astype(dtype)


pytestmark = pytest.mark.usefixtures("tuned_fresh")


def test_the_composition_rounds_half_to_even_and_maps_a_zero_row_to_scale_one():
    x = mx.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5, 3.0],
                  [0.0] * 8,
                  [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -254.0, 0.0]])
    q, scale = quantize_rows_int8(x)
    assert q.dtype == mx.int8 and scale.dtype == mx.float32
    assert scale.tolist() == [1.0, 1.0, 2.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -126, 3], [0] * 8, [127, 0, 2, 2, 0, -2, -127, 0]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nothing_tuned_runs_the_builtin_with_a_reason(dtype, rng):
    x = awkward(rng, (3,), 40, getattr(mx, dtype))
    q, scale = tuned.quantize_rows_int8(x)
    want = quantize_rows_int8(x)
    assert "no stored quantize_rows_int8 variant" in tuned.explain(OP, x)
    assert mx.array_equal(q, want[0]).item() and mx.array_equal(scale, want[1]).item()
    assert tuned.fallbacks()


@pytest.mark.parametrize("params", [{"TG": 32, "ELEMS": 1}, {"TG": 128, "ELEMS": 8}, {"TG": 1024, "ELEMS": 4}])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_kernel_through_tuned_matches_the_composition_exactly(store_dir, rng, dtype, params):
    (v,) = rows_variants(**params)
    cases = [((2, 3), 257), ((4,), 1000), ((3,), 5)]
    for lead, c in cases:  # a record at each size: tuned serves only sizes near a tuned one
        make_winner(store_dir, v, dtype, {"R": int(np.prod(lead)), "C": c})
    tuned.refresh()
    for lead, c in cases:
        x = awkward(rng, lead, c, getattr(mx, dtype))
        assert f"variant {v.id}" in tuned.explain(OP, x), tuned.explain(OP, x)
        q, scale = tuned.quantize_rows_int8(x)
        want_q, want_scale = quantize_rows_int8(x)
        assert q.dtype == mx.int8 and q.shape == x.shape and scale.dtype == mx.float32 and scale.shape == lead
        diff = np.flatnonzero(np.array(q) != np.array(want_q))
        assert diff.size == 0, f"{diff.size} q differ, first at {diff[0]}: {np.array(q).flat[diff[0]]} vs {np.array(want_q).flat[diff[0]]}"
        assert mx.array_equal(scale, want_scale).item(), (scale, want_scale)
    assert tuned.fallbacks() == {}  # the kernel ran every time


def test_an_exported_variant_runs_on_the_emulator(tmp_path):
    (v,) = rows_variants(TG=128, ELEMS=4)
    out = tmp_path / "qrows_kernel.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "hlh_mlx", "export", OP, "--variant", v.id, "-o", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    use = textwrap.dedent(f"""
        import sys, mlx.core as mx, numpy as np
        from hlh_mlx import emulator
        from hlh_mlx.ops.quantize_rows_int8 import quantize_rows_int8
        emulator.install()
        sys.path.insert(0, {str(tmp_path)!r})
        import qrows_kernel
        rng = np.random.default_rng(3)
        x = rng.standard_normal((6, 301)).astype(np.float32)
        x[0] = 0.0
        x[1] = rng.integers(-254, 255, size=301) / 2
        x[1, 7] = 127.0
        for dt in (mx.float32, mx.float16, mx.bfloat16):
            xa = mx.array(x).astype(dt)
            q, scale = qrows_kernel.quantize_rows_int8(xa)
            wq, ws = quantize_rows_int8(xa)
            assert q.dtype == mx.int8 and scale.dtype == mx.float32, (q.dtype, scale.dtype)
            assert q.shape == (6, 301) and scale.shape == (6,), (q.shape, scale.shape)
            assert mx.array_equal(q, wq).item() and mx.array_equal(scale, ws).item(), dt
        print("export ok")
    """)
    r = subprocess.run([sys.executable, "-c", use], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "export ok" in r.stdout, r.stdout + r.stderr
