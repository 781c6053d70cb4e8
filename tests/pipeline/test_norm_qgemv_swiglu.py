"""norm_qgemv_swiglu (RMSNorm, then gate and up 4-bit gemvs + SwiGLU, one launch): the reference
is the built-in composition; the tuned call matches it, refuses what no kernel serves with a
reason; the Metal template is proven on the emulator and broken copies are caught; the CUDA
template compiles for a sample of its space at the op's GPU shapes.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import cuda_source, ops, templates, tuned, variants
from hlh_mlx.cli import main
from hlh_mlx.ops import norm_qgemv_swiglu as mod
from hlh_mlx.ops.norm_qgemv_swiglu import norm_qgemv_swiglu
from hlh_mlx.ops.spec import DTYPES

from .conftest import ROOT, rel_error, ulp
from .test_tuned import write

NAME = "norm_qgemv_swiglu"
OP = ops.get(NAME)
SIMD = (ROOT / "templates" / NAME / "simd.metal.j2").read_text()


def simd_variant(**params):
    t = next(t for t in templates.discover(NAME) if t.family == "simd" and t.backend == "metal")
    return variants.make(t, params) if params else variants.expand(t)[0]


def inputs(rng, n, k, dtype, group_size=64, bits=4):
    """x (1, K) of a residual stream's size, a norm weight around 1, two quantized weights."""
    x = mx.array(rng.standard_normal((1, k)).astype(np.float32) * 3).astype(dtype)
    w = mx.array((1 + 0.5 * rng.standard_normal(k)).astype(np.float32)).astype(dtype)
    out = [x, w]
    for scale in (2.0, 1.0):
        q = mx.array((rng.standard_normal((n, k)) * scale / np.sqrt(k)).astype(np.float32)).astype(dtype)
        out += list(mx.quantize(q, group_size=group_size, bits=bits))
    return out


def composed(x, w, eps, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    """What a Llama MLP computes at decode, written out here, not taken from the op spec."""
    y = mx.fast.rms_norm(x, w, eps)
    g = mx.quantized_matmul(y, wg, sg, bg, transpose=True, group_size=group_size, bits=bits)
    u = mx.quantized_matmul(y, wu, su, bu, transpose=True, group_size=group_size, bits=bits)
    return nn.silu(g) * u




pytestmark = pytest.mark.usefixtures("tuned_fresh")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("eps", [1e-5, 2.0])
def test_reference_is_the_builtin_composition(rng, dtype, eps):
    shape = {"N": 96, "K": 1024, "G": 64}
    x, w, e, *q = OP.make_inputs(shape, DTYPES[dtype], rng)
    e = mod.eps_array(eps)
    ref = OP.reference(x, w, e, *q)[0]
    assert ref.shape == (1, 96) and ref.dtype == DTYPES[dtype]
    fn = norm_qgemv_swiglu(x, w, eps, *q, group_size=64)
    assert fn.dtype == DTYPES[dtype]
    # the function is qgemv_swiglu's on mx.fast.rms_norm, exactly
    np.testing.assert_array_equal(np.asarray(fn.astype(mx.float32)),
                                  np.asarray(composed(x, w, eps, *q).astype(mx.float32)))
    np.testing.assert_array_equal(np.asarray(OP.baseline(x, w, e, *q)[0].astype(mx.float32)),
                                  np.asarray(fn.astype(mx.float32)))
    # the reference is exactly qgemv_swiglu's on the normalised x rounded to the dtype, and that
    # y is mx.fast.rms_norm's to within one rounding (an ulp of the dtype). Their outputs are
    # not compared with the op's tolerance: an ulp of y summed over K can move a small output
    # past it (seen in bfloat16, 1.6% against 1.5%)
    y = mx.fast.rms_norm(x, w, eps)
    qs = ops.get("qgemv_swiglu")
    mine = mod._normed(x, w, e)
    np.testing.assert_array_equal(np.asarray(ref.astype(mx.float32)),
                                  np.asarray(qs.reference(mine, *q)[0].astype(mx.float32)))
    y32, mine32 = (np.asarray(v.astype(mx.float32)) for v in (y, mine))
    assert np.all(np.abs(y32 - mine32) <= ulp(np.maximum(np.abs(y32), np.abs(mine32)), dtype)), dtype
    # in half MLX's own quantized_matmul (dequantized weights in the dtype on the CPU) differs
    # from qgemv_swiglu's reference by more than the tolerance: only float32 compares the
    # built-in with the reference (the halves are pinned by the equalities above)
    if dtype == "float32":
        assert rel_error(fn, ref) < OP.tolerance[dtype], rel_error(fn, ref)


def test_the_reference_normalises_with_eps_and_the_weight(rng):
    """Not qgemv_swiglu of x: eps, norm_w and the rms each change the answer."""
    x, w, *q = inputs(rng, 64, 512, mx.float32)
    base = OP.reference(x, w, mod.eps_array(1e-5), *q)[0]
    qs = ops.get("qgemv_swiglu").reference
    assert rel_error(OP.reference(x, w, mod.eps_array(2.0), *q)[0], base) > 0.03
    assert rel_error(OP.reference(x, mx.ones_like(w), mod.eps_array(1e-5), *q)[0], base) > 0.1
    assert rel_error(qs(x * w, *q)[0], base) > 0.5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tuned_call_runs_the_winner_on_the_emulator_and_equals_the_builtin(store_dir, rng, dtype):
    v = simd_variant(NSG=2, RPS=2, PW=2)
    write(store_dir, NAME, {"N": 64, "K": 512, "G": 64}, dtype, v, ms=0.5, base_ms=1.0)
    args = inputs(rng, 48, 512, DTYPES[dtype])  # the nearest tuned shape serves N=48
    for eps in (1e-5, 2.0):  # eps is data: one kernel, any epsilon
        assert f"variant {v.id}" in tuned.explain(NAME, *args[:2], eps, *args[2:], group_size=64)
        out = tuned.norm_qgemv_swiglu(*args[:2], eps, *args[2:], group_size=64)
        assert out.shape == (1, 48) and out.dtype == DTYPES[dtype]
        ref = OP.reference(*args[:2], mod.eps_array(eps), *args[2:])[0]
        assert rel_error(out, ref) < OP.tolerance[dtype], rel_error(out, ref)
        if dtype == "float32":  # in half the CPU's quantized_matmul is off the reference itself
            assert rel_error(out, composed(*args[:2], eps, *args[2:])) < OP.tolerance[dtype]
    assert tuned.fallbacks() == {}
    # a (1, 1, K) token keeps its leading dims, as the built-in does
    y3 = tuned.norm_qgemv_swiglu(args[0].reshape(1, 1, 512), args[1], 2.0, *args[2:], group_size=64)
    assert y3.shape == (1, 1, 48)
    np.testing.assert_array_equal(np.asarray(y3.astype(mx.float32)).ravel(), np.asarray(out.astype(mx.float32)).ravel())
    assert tuned.fallbacks() == {}


def test_untuned_call_falls_back_to_the_builtin_with_a_reason(store_dir, rng):
    args = inputs(rng, 40, 256, mx.float16)
    assert tuned.explain(NAME, *args[:2], 1e-5, *args[2:]).startswith(f"built-in: no stored {NAME} variant")
    y = tuned.norm_qgemv_swiglu(*args[:2], 1e-5, *args[2:])
    np.testing.assert_array_equal(np.asarray(y.astype(mx.float32)),
                                  np.asarray(composed(*args[:2], 1e-5, *args[2:]).astype(mx.float32)))
    assert sum(tuned.fallbacks().values()) == 1


def test_under_compile_the_call_still_matches_the_builtin(store_dir, rng):
    args = inputs(rng, 64, 512, mx.float32)
    write(store_dir, NAME, {"N": 64, "K": 512, "G": 64}, "float32", simd_variant(), ms=0.5, base_ms=1.0)
    f = mx.compile(lambda x, w, *q: tuned.norm_qgemv_swiglu(x, w, 1e-5, *q, group_size=64))
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(composed(*args[:2], 1e-5, *args[2:])),
                               rtol=1e-5, atol=1e-6)
    assert [why for _, why in tuned.fallbacks()] == ["the emulator's kernels cannot run inside mx.compile"]


def test_arguments_a_kernel_cannot_serve_fall_back_with_their_reason(store_dir, rng):
    # a winner for every dtype at this shape: only the arguments can send a call to the built-in
    for dtype in ("float32", "float16"):
        write(store_dir, NAME, {"N": 64, "K": 512, "G": 64}, dtype, simd_variant(), ms=0.5, base_ms=1.0)
    x, w, wg, sg, bg, wu, su, bu = inputs(rng, 64, 512, mx.float32)
    q = (wg, sg, bg, wu, su, bu)
    assert "variant" in tuned.explain(NAME, x, w, 1e-5, *q)

    def falls_back(reason, *args, **kw):
        assert reason in tuned.explain(NAME, *args, **kw), tuned.explain(NAME, *args, **kw)
        got = tuned.norm_qgemv_swiglu(*args, **kw)  # the built-in serves it, as a model would get
        np.testing.assert_array_equal(np.asarray(got), np.asarray(composed(*args, **kw)))

    falls_back("one token only (2 rows given)", mx.concatenate([x, 2 * x]), w, 1e-5, *q)
    q8 = inputs(rng, 64, 512, mx.float32, bits=8)
    falls_back("bits=4", *q8[:2], 1e-5, *q8[2:], bits=8)
    g32 = inputs(rng, 64, 512, mx.float32, group_size=32)
    falls_back("group_size in (64, 128)", *g32[:2], 1e-5, *g32[2:], group_size=32)
    assert len(tuned.fallbacks()) == 3 and all(c == 1 for c in tuned.fallbacks().values())

    # arguments the built-in itself may refuse: the binding's reason, never a kernel launch
    assert "eps must be a number >= 0" in tuned.explain(NAME, x, w, -1.0, *q)
    assert "eps must be a number >= 0" in tuned.explain(NAME, x, w, mx.array(1e-5), *q)  # bind reads no values
    assert "need a norm weight" in tuned.explain(NAME, x, None, 1e-5, *q)
    assert "norm_w must be a (512,) vector in x's dtype" in tuned.explain(NAME, x, w[:256], 1e-5, *q)
    assert "norm_w must be a (512,) vector in x's dtype" in tuned.explain(NAME, x, w.astype(mx.float16), 1e-5, *q)
    assert "share one dtype" in tuned.explain(NAME, x, w, 1e-5, wg, sg.astype(mx.float16), bg, wu, su, bu)
    assert "wg and wu must both be" in tuned.explain(NAME, x, w, 1e-5, wg, sg, bg, wu[:32], su[:32], bu[:32])
    assert "must be (64, 8)" in tuned.explain(NAME, x, w, 1e-5, wg, sg, bg, wu, su[:, :4], bu[:, :4])
    assert "scales and biases of every weight" in tuned.explain(NAME, x, w, 1e-5, wg, sg, bg, wu, su, None)
    assert "has no tuned kernels" in tuned.explain(NAME, x.astype(mx.int32), w, 1e-5, *q)


def test_emulator_check_of_a_sample_passes(store_dir):
    r = CliRunner().invoke(main, ["check", NAME, "simd", "--sample", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output


# each a plausible slip in a fused prologue; the check must fail every one
BROKEN = {
    "eps left out": ("simd_sum(ss) / float(K) + eps[0]", "simd_sum(ss) / float(K)"),
    "norm weight left out": ("xv[j] = float(T(float(x[i]) * rs * float(norm_w[i])));",
                             "xv[j] = float(T(float(x[i]) * rs));"),
    "each lane's own squares": ("rsqrt(simd_sum(ss) / float(K)", "rsqrt(ss * 32.0f / float(K)"),
    "biases times the sum of x, not of y": ("xsum += xv[j];", "xsum += float(x[i]);"),
    "mean over the lanes' part of K": ("for (uint i = lane; i < K; i += 32)", "for (uint i = lane; i < K / 2; i += 32)"),
}


@pytest.mark.parametrize("why", BROKEN)
def test_a_broken_copy_of_the_template_is_caught(why, check_fails_on, monkeypatch):
    monkeypatch.setattr(mod, "EPS_CHOICES", (2.0,))  # eps large enough to matter in every input
    check_fails_on(NAME, SIMD, *BROKEN[why], {"NSG": 2, "RPS": 2, "PW": 2}, "float32")


def test_guard_is_clean():
    r = CliRunner().invoke(main, ["guard", str(ROOT / "templates" / NAME), str(ROOT / "hlh_mlx" / "ops" / f"{NAME}.py")])
    assert r.exit_code == 0, r.output
    assert "0 finding(s)" in r.output


needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")
CUDA = next(t for t in templates.discover(NAME) if t.backend == "cuda")
# the expected winner (first in `expect`) with and without staging, then a seeded sample
WINNER = dict(KS=1, RPT=2, TEAMS=4, PW=4, U=4, XS=0)


def test_expect_names_the_winner_first():
    # first, as `sweep --variant` takes it
    assert CUDA.expect.lstrip().startswith("KS=1,RPT=2,TEAMS=4,PW=4,U=4,XS=0 ")
    assert 20 <= len(variants.expand(CUDA)) <= 100  # a small real space, not thousands
    assert variants.make(CUDA, WINNER).supports(OP.shapes[0], "float16")


@needs_nvcc
def test_a_sample_of_the_cuda_space_compiles_at_the_gpu_shapes():
    pool = variants.expand(CUDA)
    sample = [variants.make(CUDA, WINNER), variants.make(CUDA, {**WINNER, "XS": 4096})]
    sample += [v for v in variants.sample(pool, 22, seed=11) if v.id not in {s.id for s in sample}]
    jobs = []
    shapes = OP.shapes + [{"N": 8192, "K": 8192, "G": 64}, {"N": 37, "K": 2560, "G": 64}]
    dtypes = ["float16", "bfloat16", "float32"]
    for i, v in enumerate(sample):
        # the shapes in turn, each variant at the first (from its turn on) it serves
        turn = shapes[i % len(shapes):] + shapes[:i % len(shapes)]
        jobs.append((v, next(s for s in turn if v.supports(s, "float16")), dtypes[i % 3]))
    assert len(jobs) >= 20
    cuda_source.check_variants([(v, dtype, shape) for v, shape, dtype in jobs], OP)


