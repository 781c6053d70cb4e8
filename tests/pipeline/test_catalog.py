"""Every Metal template of every op proves correct on the emulator with the sanitizer:
a fixed sample in CI, the whole space with --runslow (nightly)."""

import pytest
from click.testing import CliRunner

from hlh_mlx import ops, templates
from hlh_mlx.cli import main

METAL = sorted({t.op for t in templates.discover() if t.backend == "metal"})


def test_every_op_has_a_metal_template():
    assert set(METAL) == set(ops.names())


@pytest.mark.parametrize("op", METAL)
def test_sample_of_each_metal_template_is_correct(op, store_dir):
    r = CliRunner().invoke(main, ["check", op, "--sample", "2", "--seed", "7"])
    assert r.exit_code == 0, r.output
    assert ", 0 failed" in r.output


@pytest.mark.slow
@pytest.mark.timeout(3600)  # add_rms_norm's 360 variants x 3 dtypes took over 10 min on 2 cores
@pytest.mark.parametrize("op", METAL)
def test_whole_metal_space_is_correct(op, store_dir):
    import os
    r = CliRunner().invoke(main, ["check", op, "--workers", str(os.cpu_count() or 1)])
    assert r.exit_code == 0, r.output
    assert ", 0 failed" in r.output


def test_a_cancelling_dot_product_is_judged_by_the_size_of_its_terms():
    """One output whose products cancel to ~0: a 1e-6 difference, as another summation
    order gives, is within float32 tolerance; a wrong term is still an error."""
    import mlx.core as mx

    from hlh_mlx import check, ops
    x = mx.array([[1.0, 1.0, 1.0, 1.0]])
    w = mx.array([[0.5, -0.5, 0.25, -0.25 + 1e-6]])
    op = ops.get("gemv")
    ref = op.reference(x, w)
    scales = op.magnitude(x, w)
    near = [ref[0] + 1e-7]
    assert not check.compare(near, ref, 2e-5)[0]          # by ||ref|| alone: 0.1 relative
    assert check.compare(near, ref, 2e-5, scales)[0]      # by the terms' size: 1.4e-7
    assert not check.compare([ref[0] + 0.25], ref, 2e-5, scales)[0]
