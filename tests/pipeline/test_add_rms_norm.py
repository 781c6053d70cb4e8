"""add_rms_norm (h = x + r; y = rms_norm(h)), an op with two outputs, end to end: the tuned
call answers as the built-in composition (h bit for bit), falls back with a reason where
no kernel serves, works under mx.compile; the checker proves its variants and catches a
broken one; the sweep's timing computes every output of the built-in; export returns both."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import backends, check, ops, templates, timing, tuned, variants
from hlh_mlx.cli import main
from hlh_mlx.ops.add_rms_norm import add_rms_norm
from tests.pipeline.test_tuned import write

pytestmark = pytest.mark.usefixtures("tuned_fresh")

from .conftest import ROOT

OP = "add_rms_norm"
METAL = next(t for t in templates.discover(OP) if t.backend == "metal")
DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _variant(**params):
    return next(v for v in variants.expand(METAL) if all(v.param_dict[k] == x for k, x in params.items()))


def _inputs(rng, shape, dtype):
    c = shape[-1]
    x, r = (mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(2))
    return x, r, mx.array(rng.standard_normal(c).astype(np.float32)).astype(dtype)


def _builtin(x, r, w, eps=1e-5):
    h = x + r
    return h, mx.fast.rms_norm(h, w, eps)


def _same(got, want, dtype):
    assert isinstance(got, tuple) and len(got) == 2
    (h, y), (h0, y0) = got, want
    assert h.shape == h0.shape and y.shape == y0.shape and h.dtype == h0.dtype == y.dtype == y0.dtype
    assert mx.array_equal(h, h0).item(), "h must be x + r rounded exactly as MLX rounds it"
    err = float(np.linalg.norm(np.asarray((y - y0).astype(mx.float32))) /
                np.linalg.norm(np.asarray(y0.astype(mx.float32))))
    assert err <= ops.get(OP).tolerance[dtype], f"y: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_tuned_variant_answers_as_the_builtin_composition(store_dir, rng, dtype):
    v = _variant(TPR=64, ROWS=2, NR=4, VEC=1, REGS=1)
    write(store_dir, OP, {"R": 8, "C": 512}, dtype, v, ms=0.5, base_ms=1.0)
    for shape in ((2, 3, 500), (7, 512), (4, 1000)):  # rows left over; a partial last vector step
        x, r, w = _inputs(rng, shape, DT[dtype])
        assert f"variant {v.id}" in tuned.explain(OP, x, r, w, 1e-5)
        _same(tuned.add_rms_norm(x, r, w, 1e-5), _builtin(x, r, w), dtype)
    assert tuned.fallbacks() == {}


def test_with_nothing_tuned_the_builtin_runs_and_says_why(store_dir, rng):
    x, r, w = _inputs(rng, (4, 96), mx.float16)
    _same(tuned.add_rms_norm(x, r, w, 1e-5), _builtin(x, r, w), "float16")
    _same(tuned.call(OP, x, r, w, 1e-5), add_rms_norm(x, r, w, 1e-5), "float16")
    (why, n), = tuned.fallbacks().items()
    assert n == 1 and why[0] == OP  # one distinct call (twice): counted once and "no stored add_rms_norm variant" in why[1]


def test_arguments_no_kernel_takes_fall_back_with_the_reason(store_dir, rng):
    write(store_dir, OP, {"R": 8, "C": 512}, "float32", _variant(), ms=0.5, base_ms=1.0)
    x, r, w = _inputs(rng, (8, 512), mx.float32)
    cases = [
        ("eps must be a number", (x, r, w, -1.0)),
        ("x's shape and dtype", (x, r[:1], w, 1e-5)),                    # a broadcast residual
        ("x's shape and dtype", (x, r.astype(mx.float16), w, 1e-5)),     # promotion
        ("weight must be a vector", (x, r, w.astype(mx.float16), 1e-5)),
        ("weight must be a vector", (x, r, w[:256], 1e-5)),              # the built-in's own error
    ]
    for why, args in cases:
        assert tuned.explain(OP, *args).startswith("built-in") and why in tuned.explain(OP, *args), why
        try:
            want = add_rms_norm(*args)
        except ValueError as e:
            with pytest.raises(type(e)):
                tuned.add_rms_norm(*args)
            continue
        got = tuned.add_rms_norm(*args)
        assert isinstance(got, tuple) and len(got) == 2
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and mx.allclose(a, b).item()
    # the call the built-in refuses (its error raised) is no fallback: nothing ran
    reasons = {why for op, why in tuned.fallbacks() if op == OP}
    assert len(reasons) == 3 and sum(tuned.fallbacks().values()) == 4
    _same(tuned.add_rms_norm(x, r, w, 1e-5), _builtin(x, r, w), "float32")  # and the good call runs the kernel
    assert sum(tuned.fallbacks().values()) == 4


def test_under_mx_compile(store_dir, rng, monkeypatch):
    """On the emulator the user's compiled function runs the built-in (counted); where
    kernels are graph nodes (stood in for here) the compiled plan returns both outputs."""
    write(store_dir, OP, {"R": 8, "C": 512}, "float32", _variant(), ms=0.5, base_ms=1.0)
    x, r, w = _inputs(rng, (8, 512), mx.float32)
    f = mx.compile(lambda x, r, w: tuned.add_rms_norm(x, r, w, 1e-5))
    _same(f(x, r, w), _builtin(x, r, w), "float32")
    assert any("inside mx.compile" in why for _, why in tuned.fallbacks())

    class GraphKernel:  # the op as graph nodes, in the kernel's output order (h, y)
        def __init__(self, variant, backend):
            pass

        def launcher(self, shape, dtype, out_shapes, out_dtypes):
            def launch(x, r, w, eps):
                h = x + r
                y = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + eps) * w
                return [h.reshape(out_shapes[0]), y.reshape(out_shapes[1])]
            return launch
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))
    monkeypatch.setattr(backends, "Kernel", GraphKernel)
    tuned.refresh()
    x3 = x.reshape(2, 4, 512)
    for _ in range(2):
        _same(f(x3, r.reshape(2, 4, 512), w), _builtin(x3, r.reshape(2, 4, 512), w), "float32")
    assert tuned.fallbacks() == {}


def test_a_gradient_through_a_variant_takes_both_outputs_cotangents(store_dir, rng, monkeypatch):
    """Two outputs hand the VJP a cotangent each: the built-in's VJP gets both."""
    class GraphKernel:
        def __init__(self, variant, backend):
            pass

        def launcher(self, shape, dtype, out_shapes, out_dtypes):
            def launch(x, r, w, eps):
                h = x + r
                return [h.reshape(out_shapes[0]), (mx.fast.rms_norm(h, w, 1e-5) * 1.0).reshape(out_shapes[1])]
            return launch
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))
    monkeypatch.setattr(backends, "Kernel", GraphKernel)
    write(store_dir, OP, {"R": 4, "C": 64}, "float32", _variant(), ms=0.5, base_ms=1.0)
    tuned.refresh()
    x, r, w = _inputs(rng, (4, 64), mx.float32)

    def loss(fn):  # weights the outputs differently, so a swapped or dropped cotangent shows
        return lambda x, r, w: (lambda h, y: (h * h).sum() + 3 * (y * x).sum())(*fn(x, r, w, 1e-5))
    got = mx.grad(loss(tuned.add_rms_norm), argnums=(0, 1, 2))(x, r, w)
    want = mx.grad(loss(add_rms_norm), argnums=(0, 1, 2))(x, r, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert tuned.fallbacks() == {}


def test_a_gradient_goes_through_the_builtin_where_it_runs(store_dir, rng):
    x, r, w = _inputs(rng, (4, 64), mx.float32)

    def loss(fn):
        return lambda x, r, w: sum(((o * o).sum() for o in fn(x, r, w, 1e-5)), mx.array(0.0))
    for a, b in zip(mx.grad(loss(tuned.add_rms_norm), argnums=(0, 1, 2))(x, r, w),
                    mx.grad(loss(add_rms_norm), argnums=(0, 1, 2))(x, r, w)):
        assert mx.allclose(a, b).item()


def test_the_checker_proves_a_sample_on_the_emulator(store_dir):
    r = CliRunner().invoke(main, ["check", OP, "rows", "--sample", "2", "--seed", "13"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output  # 2 variants x 3 dtypes, sanitizer on


def _broken(tmp_path, old, new):
    text = METAL.path.read_text()
    assert old in text
    p = tmp_path / OP / "rows.metal.j2"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text.replace(old, new))
    return templates.load(p)


@pytest.mark.parametrize("old,new,error", [
    ("hr[i + j] = o;", "", "output 0: .* outputs are NaN/inf"),                         # h's scalar path unwritten
    ("uint n = row < R ? C : 0;", "uint n = row + 1 < R ? C : 0;", "output 0: .* NaN/inf"),  # last row skipped
    ("ss / float(C)", "ss / float(C + 1)", "relative error"),                          # y wrong, h right
])
def test_the_checker_catches_a_broken_variant(tmp_path, rng, old, new, error):
    t = _broken(tmp_path, old, new)
    v = next(v for v in variants.expand(t) if v.param_dict == dict(TPR=32, ROWS=2, NR=2, VEC=0, REGS=1))
    k = backends.Kernel(v, "emulator", sanitize=True)
    op = ops.get(OP)
    _, failure = check.check_shapes(k, op, v, op.emulator_shapes + op.edge_shapes, "float32", rng)
    assert failure is not None
    import re
    assert re.search(error, failure), failure


def test_the_sweeps_timing_computes_every_output_of_the_builtin(monkeypatch):
    """A chain reads only each call's first output; the built-in's second output (its
    rms_norm) must still be computed, as the kernel computes it."""
    evaluated = []
    real_eval = mx.eval

    def spy(*arrays):
        evaluated.extend(arrays)
        return real_eval(*arrays)
    monkeypatch.setattr(mx, "eval", spy)
    seen = []

    def fn(x, r, w):
        h, y = _builtin(x, r, w)
        seen.append(y)
        return [h, y]
    sets = [[mx.ones((2, 8)), mx.ones((2, 8)), mx.ones((8,))]]
    for chain in (True, False):
        evaluated.clear()
        timing.measure(fn, sets, cache_resident=True, chain=chain, warmup=0, repeats=1, max_batch=3, target_ms=1e9)
        ids = {id(a) for a in evaluated}
        assert all(id(y) in ids for y in seen[-3:])


def test_export_returns_both_outputs(tmp_path, rng):
    v = _variant(TPR=64, ROWS=4, NR=8, VEC=1, REGS=2)
    out = tmp_path / "kernel.py"
    r = CliRunner().invoke(main, ["export", OP, "--variant", v.id, "-o", str(out)])
    assert r.exit_code == 0, r.output
    cuda = next(t for t in templates.discover(OP) if t.backend == "cuda")
    r = CliRunner().invoke(main, ["export", OP, "--variant", variants.expand(cuda)[0].id, "-o", str(tmp_path / "k2.py")])
    assert r.exit_code == 0 and "mx.fast.cuda_kernel" in (tmp_path / "k2.py").read_text(), r.output
    seed = int(rng.integers(2**31))
    script = f"""
import mlx.core as mx, numpy as np, sys
from hlh_mlx import emulator
emulator.install()
sys.path.insert(0, {str(tmp_path)!r})
import kernel
rng = np.random.default_rng({seed})
x, r = (mx.array(rng.standard_normal((6, 1000)).astype(np.float32)).astype(mx.float16) for _ in range(2))
w = mx.array(rng.standard_normal(1000).astype(np.float32)).astype(mx.float16)
h, y = kernel.add_rms_norm(x, r, w, mx.array([1e-5], dtype=mx.float32))
assert mx.array_equal(h, x + r).item(), "h"
y0 = mx.fast.rms_norm(x + r, w, 1e-5)
err = float(mx.linalg.norm((y - y0).astype(mx.float32)) / mx.linalg.norm(y0.astype(mx.float32)))
assert err < 2e-3, err
print("ok", err)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr
