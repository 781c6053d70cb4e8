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
@pytest.mark.parametrize("op", METAL)
def test_whole_metal_space_is_correct(op, store_dir):
    r = CliRunner().invoke(main, ["check", op])
    assert r.exit_code == 0, r.output
