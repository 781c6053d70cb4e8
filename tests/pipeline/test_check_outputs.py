"""The checker with several outputs of different dtypes: an integer output is compared
exactly and its unwritten elements are caught (NaN means nothing to an integer), and a
floating output may be inf where the reference is inf at the same place."""

import mlx.core as mx
import numpy as np

from hlh_mlx import check
from hlh_mlx.ops.spec import OpSpec, random_array

ROWMAX = OpSpec(
    name="rowmax", dims=("R", "C"),
    make_inputs=lambda s, dt, rng: [random_array(rng, (s["R"], s["C"]), dt)],
    reference=lambda x: [mx.max(x, axis=-1), mx.argmax(x, axis=-1).astype(mx.uint32)],
    output_shapes=lambda s: [(s["R"],), (s["R"],)],
    output_dtypes=lambda dt: [dt, mx.uint32],
    tolerance={"float32": 1e-6}, bytes=lambda s, n: 0, flops=lambda s: 0,
    shapes=[], emulator_shapes=[], edge_shapes=[], dtypes=("float32",),
)
SHAPE = {"R": 6, "C": 33}


def kernel(values_of=lambda x: mx.max(x, axis=-1), rows_written=None, index_shift=0):
    """A stand-in kernel honouring MLX's init_value (every output starts as it)."""
    def run(inputs, shape, dtype, out_shapes, out_dtypes, init_value=None):
        x = inputs[0]
        vals, idx = values_of(x), mx.argmax(x, axis=-1).astype(mx.uint32) + index_shift
        if rows_written is not None:
            keep = mx.arange(shape["R"]) < rows_written
            idx = mx.where(keep, idx, mx.array(init_value).astype(mx.uint32))
        return [vals, idx]
    return run


def test_two_outputs_of_two_dtypes_pass_when_right(rng):
    assert check.check(kernel(), ROWMAX, SHAPE, "float32", rng).ok


def test_an_unwritten_integer_output_is_caught(rng):
    r = check.check(kernel(rows_written=5), ROWMAX, SHAPE, "float32", rng)
    assert not r.ok and "output 1: 1 of 6 elements never written, first at (5,)" in r.error


def test_a_wrong_index_is_never_within_a_tolerance(rng):
    r = check.check(kernel(index_shift=1), ROWMAX, SHAPE, "float32", rng)
    assert not r.ok and "integer outputs differ from the reference" in r.error


def test_inf_where_the_reference_has_inf_passes_and_elsewhere_fails():
    ref = [mx.array([-np.inf, 1.0, 2.0]), mx.array([0, 1, 2], dtype=mx.uint32)]
    same = [mx.array([-np.inf, 1.0, 2.0]), mx.array([0, 1, 2], dtype=mx.uint32)]
    assert check.compare(same, ref, 1e-6)[0]
    wrong = [mx.array([1.0, np.inf, 2.0]), mx.array([0, 1, 2], dtype=mx.uint32)]
    ok, _, _, why = check.compare(wrong, ref, 1e-6)
    assert not ok and "NaN/inf (unwritten?) where the reference is finite" in why


def racy(noise):
    """A kernel whose answer moves a little from run to run (within the tolerance each
    time), as a race between threads makes it: caught only by running it twice."""
    runs = []

    def run(inputs, shape, dtype, out_shapes, out_dtypes, init_value=None):
        runs.append(1)
        x = inputs[0]
        return [mx.max(x, axis=-1) * (1 + noise * len(runs)), mx.argmax(x, axis=-1).astype(mx.uint32)]
    return run


def test_a_kernel_whose_answer_changes_between_runs_fails_when_run_twice(rng):
    assert check.check(racy(1e-9), ROWMAX, SHAPE, "float32", rng).ok  # each answer within 1e-6
    r = check.check(racy(1e-7), ROWMAX, SHAPE, "float32", rng, repeat=True)
    assert not r.ok and "two runs on the same inputs differ" in r.error and "race" in r.error
    assert check.check(racy(0.0), ROWMAX, SHAPE, "float32", rng, repeat=True).ok  # a deterministic one passes


ROWSUM = OpSpec(
    name="rowsum", dims=("R", "C"),
    make_inputs=lambda s, dt, rng: [random_array(rng, (s["R"], s["C"]), dt)],
    reference=lambda x: [mx.sum(x, axis=-1)],
    output_shapes=lambda s: [(s["R"],)], output_dtypes=lambda dt: [dt],
    tolerance={"float32": 1e-5}, bytes=lambda s, n: 0, flops=lambda s: 0,
    shapes=[], emulator_shapes=[], edge_shapes=[], dtypes=("float32",),
)


def test_a_floating_only_kernel_is_run_twice_when_asked(rng):
    runs = []

    def run(inputs, shape, dtype, out_shapes, out_dtypes, init_value=None):
        runs.append(1)
        return [mx.sum(inputs[0], axis=-1) + 1e-6 * (len(runs) % 2)]
    assert check.check(run, ROWSUM, SHAPE, "float32", rng).ok and len(runs) == 1
    r = check.check(run, ROWSUM, SHAPE, "float32", rng, repeat=True)
    assert not r.ok and "two runs on the same inputs differ in 6 of 6 elements" in r.error and len(runs) == 3
