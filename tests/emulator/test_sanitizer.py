"""Each sanitizer fault is caught on a planted bug, names the line and threads, and is
silent on the correct kernel next to it."""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator
from hlh_mlx.emulator import SanitizerError

REDUCE = """
threadgroup float buf[64];
uint t = thread_index_in_threadgroup;
buf[t] = inp[thread_position_in_grid.x];
BARRIER1
for (uint s = 32; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    BARRIER2
}
if (t == 0) out[threadgroup_position_in_grid.x] = buf[0];
"""
BAR = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def run(src, x, groups, sanitize=True, tg=64, header=""):
    k = emulator.metal_kernel("planted", ["inp"], ["out"], src, header=header, sanitize=sanitize)
    return k(inputs=[x], grid=(tg * groups, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(groups,)],
             output_dtypes=[mx.float32])[0]


def line_of(src, needle):
    return next(i for i, l in enumerate(src.splitlines(), 1) if needle in l)


def test_correct_reduction_is_silent_and_right(rng):
    x = mx.array(rng.standard_normal(256).astype(np.float32))
    y = run(REDUCE.replace("BARRIER1", BAR).replace("BARRIER2", BAR), x, 4)
    rows = np.asarray(x).reshape(4, 64)
    # a float32 tree sum against a float64 one: rounding scales with the terms, not with a sum
    # that cancels (a relative tolerance failed at a seed whose sum was -0.04 of terms near 1)
    np.testing.assert_allclose(np.asarray(y), rows.astype(np.float64).sum(1), rtol=0,
                               atol=64 * np.finfo(np.float32).eps * np.abs(rows).sum(1).max())


def test_missing_barrier_is_a_race_with_line_and_threads(rng):
    src = REDUCE.replace("BARRIER1", BAR).replace("BARRIER2", "")
    with pytest.raises(SanitizerError) as e:
        run(src, mx.array(rng.standard_normal(128).astype(np.float32)), 2)
    err = e.value
    assert err.kind == "race"
    assert err.line == line_of(src, "buf[t] += buf[t + s]")
    assert len(err.threads) == 2 and err.threads[0] != err.threads[1]
    assert "race" in str(err) and "source line" in str(err)


def test_missing_barrier_without_sanitizer_shows_as_nan(rng):
    # unsanitized, threads run one after another: thread 0 reads slots later threads
    # have not written yet, and threadgroup memory starts as NaN
    src = REDUCE.replace("BARRIER1", "").replace("BARRIER2", "")
    x = mx.array(rng.standard_normal(64).astype(np.float32))
    y = run(src, x, 1, sanitize=False)
    assert np.isnan(np.asarray(y)).all()


def test_uninitialized_threadgroup_read(rng):
    src = REDUCE.replace("buf[t] = inp[thread_position_in_grid.x];", "if (t < 32) buf[t] = inp[thread_position_in_grid.x];")
    src = src.replace("BARRIER1", BAR).replace("BARRIER2", BAR)
    with pytest.raises(SanitizerError) as e:
        run(src, mx.array(rng.standard_normal(64).astype(np.float32)), 1)
    assert e.value.kind == "uninitialized"
    assert e.value.line == line_of(src, "buf[t] += buf[t + s]")


def test_poisoned_threadgroup_memory_shows_missing_writes_as_nan(rng):
    src = "threadgroup float buf[64]; uint t = thread_index_in_threadgroup; if (t == 0) out[0] = buf[5];"
    y = run(src, mx.array(rng.standard_normal(64).astype(np.float32)), 1, sanitize=False)
    assert np.isnan(np.asarray(y)).all()


def test_out_of_bounds_device_read_and_write(rng):
    x = mx.array(rng.standard_normal(64).astype(np.float32))
    read = "uint i = thread_position_in_grid.x;\nif (i == 0) out[0] = inp[64];"
    with pytest.raises(SanitizerError) as e:
        run(read, x, 1)
    assert e.value.kind == "out-of-bounds" and e.value.line == 2 and "'inp'" in str(e.value)
    write = "uint i = thread_position_in_grid.x;\nout[i] = 1.0f;"  # 64 threads, 1 output
    with pytest.raises(SanitizerError) as e:
        run(write, x, 1)
    assert e.value.kind == "out-of-bounds" and "write" in str(e.value) and "'out'" in str(e.value)
    assert e.value.threads[0]["thread_position_in_grid"] == [1, 0, 0]


def test_out_of_bounds_threadgroup_access(rng):
    src = "threadgroup float buf[16];\nuint t = thread_index_in_threadgroup;\nbuf[t] = 1.0f;\nout[0] = 0.0f;"
    with pytest.raises(SanitizerError) as e:
        run(src, mx.array(rng.standard_normal(64).astype(np.float32)), 1)
    assert e.value.kind == "out-of-bounds" and e.value.line == 3


def test_barrier_after_early_return_is_divergence(rng):
    src = "uint t = thread_index_in_threadgroup;\nif (t >= 60) return;\n" + BAR + "\nout[0] = 1.0f;"
    x = mx.array(rng.standard_normal(64).astype(np.float32))
    with pytest.raises(SanitizerError) as e:
        run(src, x, 1)
    assert e.value.kind == "barrier-divergence" and e.value.line == 3
    with pytest.warns(RuntimeWarning, match="barrier-divergence"):
        run(src, x, 1, sanitize=False)


def test_barriers_at_different_calls_are_divergence(rng):
    src = ("uint t = thread_index_in_threadgroup;\nif (t < 32) {\n" + BAR + "\n} else {\n" + BAR
           + "\n}\nout[0] = 1.0f;")
    with pytest.raises(SanitizerError) as e:
        run(src, mx.array(rng.standard_normal(64).astype(np.float32)), 1)
    assert e.value.kind == "barrier-divergence"


def test_simdgroup_barrier_orders_lanes_of_one_simdgroup(rng, monkeypatch):
    ok = """
    threadgroup float buf[32];
    uint l = thread_index_in_simdgroup;
    buf[l] = inp[l];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    if (l == 0) { float s = 0; for (int k = 0; k < 32; k++) s += buf[k]; out[0] = s; }
    """
    x = mx.array(rng.standard_normal(32).astype(np.float32))
    y = run(ok, x, 1, tg=32)
    np.testing.assert_allclose(np.asarray(y), [np.asarray(x).sum()], rtol=1e-5)
    bad = ok.replace("simdgroup_barrier(mem_flags::mem_threadgroup);", "")
    # lane 0 runs first and reads slots lanes 1..31 write later in the same interval: a race
    # (not "uninitialized"), naming the reader and the writer; in either order
    for order in ("forward", "reverse"):
        monkeypatch.setenv("HLH_MLX_EMU_ORDER", order)
        with pytest.raises(SanitizerError, match="race") as e:
            run(bad, x, 1, tg=32)
        assert e.value.kind == "race" and len(e.value.threads) == 2
        assert {t["thread_index_in_threadgroup"] for t in e.value.threads} >= {0}


def test_atomics_in_threadgroup_memory_do_not_race(rng):
    src = """
    threadgroup atomic_int count;
    uint t = thread_index_in_threadgroup;
    if (t == 0) atomic_store_explicit(&count, 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (inp[t] > 0.0f) atomic_fetch_add_explicit(&count, 1, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t == 0) out[0] = float(atomic_load_explicit(&count, memory_order_relaxed));
    """
    x = mx.array(rng.standard_normal(64).astype(np.float32))
    y = run(src, x, 1)
    assert np.asarray(y)[0] == (np.asarray(x) > 0).sum()


def test_env_switches_the_sanitizer_on(monkeypatch, rng):
    monkeypatch.setenv("HLH_MLX_SANITIZE", "1")
    k = emulator.metal_kernel("planted", ["inp"], ["out"], "out[0] = inp[100];")
    with pytest.raises(SanitizerError, match="out-of-bounds"):
        k(inputs=[mx.zeros((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
