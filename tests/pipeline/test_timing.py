"""The timing module's input rotation (timing itself needs a GPU and is checked by the
benchmarks, never by timed unit tests)."""

import mlx.core as mx
import numpy as np

from hlh_mlx import timing


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
