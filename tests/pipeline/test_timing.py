"""The timing module's input rotation (timing itself needs a GPU and is checked by the
benchmarks, never by timed unit tests)."""

import mlx.core as mx
import numpy as np

from hlh_mlx import timing
from hlh_mlx.ops import spec


def test_input_sets_fill_the_rotation_budget_with_separate_buffers(monkeypatch):
    monkeypatch.setattr(timing, "ROTATE_BYTES", 64 * 1024)
    made = []

    def make():
        made.append(1)
        return [mx.arange(1024, dtype=mx.float32), mx.arange(1024, dtype=mx.uint32)]

    sets, resident = timing.input_sets(make, 8 * 1024)
    assert len(made) == 1 and len(sets) == 8 and not resident
    addresses = {np.asarray(s[0]).__array_interface__["data"][0] for s in sets}
    assert len(addresses) == 8  # eight buffers, not eight names for one
    assert all(s[1].dtype == mx.uint32 and mx.array_equal(s[0], sets[0][0]) for s in sets)


def test_small_inputs_that_cannot_fill_it_are_labelled_cache_resident(monkeypatch):
    monkeypatch.setattr(timing, "ROTATE_BYTES", 1 << 30)
    sets, resident = timing.input_sets(lambda: [mx.zeros((16,))], 64)
    assert len(sets) == timing.MAX_SETS and resident


def test_scalars_are_shared_across_input_sets_not_copied(monkeypatch):
    # a copy of a few bytes would land in MLX's managed pool (read across the bus on CUDA),
    # where a program passes one device-resident constant
    monkeypatch.setattr(timing, "ROTATE_BYTES", 64 * 1024)
    eps = spec.constant([1e-5], mx.float32)
    sets, _ = timing.input_sets(lambda: [mx.arange(1024, dtype=mx.float32), eps], 8 * 1024)
    assert len(sets) == 8
    assert all(s[1] is eps for s in sets)
    assert len({id(s[0]) for s in sets}) == 8


def test_constants_are_made_once_with_their_values():
    a = spec.constant([0.25, 1.0], mx.float32)
    assert a is spec.constant([0.25, 1.0], mx.float32)  # one array per values and dtype
    assert a.shape == (2,) and a.dtype == mx.float32 and a.tolist() == [0.25, 1.0]
    b = spec.constant([3], mx.int32)
    assert b.dtype == mx.int32 and b.tolist() == [3] and b is not spec.constant([3], mx.float32)
    # values that float() or == would merge stay apart
    assert spec.constant([2 ** 53 + 1], mx.int64).tolist() == [2 ** 53 + 1]
    assert spec.constant([2 ** 53], mx.int64).tolist() == [2 ** 53]
    assert str(spec.constant([-0.0], mx.float32).tolist()) == "[-0.0]"
    # an op's random inputs: the same values, an array of their own
    c = spec.input_constant([0.25, 1.0], mx.float32)
    assert c is not a and c.tolist() == [0.25, 1.0]
    # what the ops pass as eps, scale and offset is such a constant, the same every call
    from hlh_mlx.ops.rms_norm import eps_array
    assert eps_array(1e-6) is eps_array(1e-6) and eps_array(1e-6).item() == np.float32(1e-6)


def test_a_constant_first_made_inside_a_compiled_trace_serves_later_calls():
    # made (and evaluated) while a trace runs, then captured by another trace and used
    # uncompiled: always the same values, never an error
    value = 0.3141592653589793

    def scaled(x):
        return x * spec.constant([value], mx.float32)
    f = mx.compile(scaled)
    g = mx.compile(lambda x: x + spec.constant([value], mx.float32))
    x = mx.ones((3,))
    assert np.allclose(np.array(f(x)), np.float32(value))
    assert np.allclose(np.array(g(x)), 1 + np.float32(value))
    assert np.allclose(np.array(scaled(x)), np.float32(value))


def test_no_op_makes_a_kernel_scalar_with_mx_array():
    # `mx.array([v])` of a few bytes lands in MLX's managed pool on CUDA (read across the
    # bus by every warp that reads it): ops make such inputs with spec.constant
    import re
    from pathlib import Path
    ops_dir = Path(spec.__file__).parent
    found = [f"{p.name}:{i}" for p in sorted(ops_dir.glob("*.py")) if p.name != "spec.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"mx\.array\(\s*\[", line)]
    assert found == [], f"use spec.constant / spec.input_constant: {found}"
