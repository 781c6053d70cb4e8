"""benchmarks/tuned_calls.py calls each op as a user does, over the op's own input layout:
every op it times must accept that layout and agree with the built-in (a changed layout,
such as rms_norm's eps becoming an input, broke three cases on the GPU once)."""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import ops

from .test_benchmark_outputs import ROOT, _load

BENCH = _load(ROOT / "benchmarks" / "tuned_calls.py")
TINY = {"rms_norm": "3x64", "layer_norm": "3x64", "softmax": "3x64", "swiglu": "2x64", "rope": "4x2x16x0",
        "gemv": "1x32x64", "qgemv": "64x128x64", "matmul": "8x16x32", "decode_attention": "4x2x16x32"}


def test_every_timed_op_has_a_tiny_shape_here():
    assert {op for op, _ in BENCH.CASES} <= set(TINY)


@pytest.mark.parametrize("op_name", sorted(TINY))
def test_builtin_and_tuned_calls_take_the_ops_inputs_and_agree(op_name):
    op = ops.get(op_name)
    shape = op.parse_shape(TINY[op_name])
    inputs = op.make_inputs(shape, mx.float32, np.random.default_rng(1))
    builtin, tuned_fn = BENCH.calls(op_name, shape, inputs)
    a, b = builtin(*inputs), tuned_fn(*inputs)
    assert a.shape == b.shape
    np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-4)
