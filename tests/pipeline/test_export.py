"""Exported kernels: self-contained (only mlx imported), guarded, correct, and clean under guard."""

import ast
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from hlh_mlx import export, guard, templates, variants
from hlh_mlx.cli import main

from .conftest import ROOT


def run_guarded(script: str) -> str:
    """Run a test script in a fresh process; it must succeed and print its 'guarded:' line."""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert "guarded:" in p.stdout, p.stdout
    return p.stdout


def first_variant(op, family):
    t = next(t for t in templates.discover(op) if t.family == family and t.backend == "metal")
    return variants.expand(t)[0]


@pytest.mark.parametrize("op,family", [("matmul", "tiled"), ("rms_norm", "rows")])
def test_exported_module_runs_without_hlh_mlx_and_is_correct(tmp_path, op, family):
    v = first_variant(op, family)
    out = tmp_path / "kernel.py"
    r = CliRunner().invoke(main, ["export", op, "--variant", v.id, "-o", str(out), "--format", "kernelbot"])
    assert r.exit_code == 0, r.output
    tree = ast.parse(out.read_text())
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imports == {"mlx.core"}
    assert guard.scan_python(out) == []
    # run it in a fresh process; off a Mac the emulator stands in for mx.fast.metal_kernel
    script = f"""
import mlx.core as mx, numpy as np, sys
from hlh_mlx import emulator
emulator.install()
sys.path.insert(0, {str(tmp_path)!r})
import kernel
rng = np.random.default_rng(1)
if {op!r} == "matmul":
    a, b = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((33, 19), (19, 47)))
    y, ref = kernel.custom_kernel((a, b)), a @ b
else:
    x, w = mx.array(rng.standard_normal((5, 300)).astype(np.float32)), mx.array(rng.standard_normal(300).astype(np.float32))
    y, ref = kernel.custom_kernel((x, w, mx.array([1e-5], dtype=mx.float32))), mx.fast.rms_norm(x, w, 1e-5)
assert np.allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-5), "wrong result"
try:
    kernel.{op}(*([mx.zeros((4, 4, 4))] * {2 if op == 'matmul' else 3}))
except ValueError as e:
    print("guarded:", e)
"""
    assert "must have shape" in run_guarded(script)


def test_export_of_an_unknown_variant_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["export", "matmul", "--variant", "nope", "-o", str(tmp_path / "k.py")])
    assert r.exit_code != 0 and "no current matmul variant with id 'nope'" in r.output


@pytest.mark.parametrize("op,family,shape", [
    ("qgemv", "simd", {"N": 37, "K": 320, "G": 64}),
    ("rope", "pairs", {"R": 3, "T": 7, "D": 10, "TRAD": 1}),
    ("decode_attention", "simd", {"HQ": 8, "HKV": 2, "L": 33, "D": 64}),
    ("gemv", "simd", {"M": 3, "N": 37, "K": 1001}),
    ("moe_qgemv_swiglu", "simd", {"S": 2, "E": 3, "N": 37, "K": 320, "G": 64}),
    ("moe_qgemv_combine", "simd", {"S": 2, "E": 3, "N": 37, "K": 320, "G": 64}),
])
def test_exported_ops_with_mixed_input_dtypes_are_correct(tmp_path, op, family, shape):
    v = first_variant(op, family)
    out = tmp_path / "kernel.py"
    r = CliRunner().invoke(main, ["export", op, "--variant", v.id, "-o", str(out), "--format", "kernelbot"])
    assert r.exit_code == 0, r.output
    script = f"""
import mlx.core as mx, numpy as np, sys
from hlh_mlx import emulator, ops
emulator.install()
sys.path.insert(0, {str(tmp_path)!r})
import kernel
spec = ops.get({op!r})
inputs = spec.make_inputs({shape!r}, mx.float16, np.random.default_rng(3))
y, ref = kernel.custom_kernel(tuple(inputs)), spec.reference(*inputs)[0]
err = float(mx.linalg.norm((y - ref).astype(mx.float32)) / mx.linalg.norm(ref.astype(mx.float32)))
assert err < spec.tolerance["float16"], err
try:
    kernel.{op}(inputs[0].astype(mx.int32), *inputs[1:])
except ValueError as e:
    print("guarded:", e)
"""
    assert "must have dtypes" in run_guarded(script)


def test_cuda_export_requests_the_variants_dynamic_shared_memory(monkeypatch):
    """A CUDA kernel whose tiles live in dynamic shared memory must ask MLX for it, or it
    would launch with none; no GPU here, so the factory call itself is what is checked."""
    t = next(t for t in templates.discover("matmul") if t.name == "mma.cuda")
    v = variants.make(t, {"BM": 128, "BN": 128, "BK": 32, "WM": 2, "WN": 2, "STAGES": 3, "SWZ": 8, "FB": 2})
    seen = {}
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: seen.update(kw), raising=False)
    exec(compile(export.render_module("matmul", v.id), "kernel.py", "exec"), {})
    assert seen["shared_memory"] == v.shared_memory() == 3 * (128 * 40 + 32 * 136) * 2
    assert seen["source"] == v.rendered.source


def test_an_exported_routing_kernel_reads_its_choices_from_route(tmp_path):
    """moe_route's S, ORDER and NORM are template arguments: the exported module reads them
    from its `route` input and gives the op's two outputs."""
    v = first_variant("moe_route", "select")
    out = tmp_path / "kernel.py"
    r = CliRunner().invoke(main, ["export", "moe_route", "--variant", v.id, "-o", str(out), "--format", "kernelbot"])
    assert r.exit_code == 0, r.output
    script = f"""
import mlx.core as mx, numpy as np, sys
from hlh_mlx import emulator, ops
emulator.install()
sys.path.insert(0, {str(tmp_path)!r})
import kernel
spec = ops.get("moe_route")
for shape in ({{"E": 60, "S": 4, "ORDER": 0, "NORM": 0}}, {{"E": 37, "S": 5, "ORDER": 1, "NORM": 1}}):
    inputs = spec.make_inputs(shape, mx.float16, np.random.default_rng(3))
    inds, scores = kernel.custom_kernel(tuple(inputs))
    ref_inds, ref_scores = spec.reference(*inputs)
    assert np.array_equal(np.asarray(inds), np.asarray(ref_inds)), (inds, ref_inds)
    assert np.allclose(np.asarray(scores), np.asarray(ref_scores), rtol=2e-3)
try:
    kernel.moe_route(inputs[0].astype(mx.int32), inputs[1])
except ValueError as e:
    print("guarded:", e)
"""
    assert "must have dtypes" in run_guarded(script)
