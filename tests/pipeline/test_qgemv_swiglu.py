"""qgemv_swiglu (gate and up 4-bit gemvs + SwiGLU in one launch): the tuned call matches the
built-in composition, refuses what it cannot serve with a reason, and its templates are
proven and a broken copy of one is caught.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import cuda_source, ops, templates, tuned, variants
from hlh_mlx.cli import main

from .conftest import ROOT
from .test_tuned import write

OP = ops.get("qgemv_swiglu")
SIMD = (ROOT / "templates" / "qgemv_swiglu" / "simd.metal.j2").read_text()


def simd_variant(**params):
    t = next(t for t in templates.discover("qgemv_swiglu") if t.family == "simd" and t.backend == "metal")
    return variants.make(t, params) if params else variants.expand(t)[0]


def weights(rng, n, k, dtype, group_size=64, bits=4):
    x = mx.array(rng.standard_normal((1, k)).astype(np.float32)).astype(dtype)
    out = [x]
    for scale in (2.0, 1.0):
        w = mx.array((rng.standard_normal((n, k)) * scale / np.sqrt(k)).astype(np.float32)).astype(dtype)
        out += list(mx.quantize(w, group_size=group_size, bits=bits))
    return out


def composed(x, wg, sg, bg, wu, su, bu, group_size=64, bits=4):
    """What a Llama MLP computes at decode, written out here, not taken from the op spec."""
    g = mx.quantized_matmul(x, wg, sg, bg, transpose=True, group_size=group_size, bits=bits)
    u = mx.quantized_matmul(x, wu, su, bu, transpose=True, group_size=group_size, bits=bits)
    return nn.silu(g) * u


pytestmark = pytest.mark.usefixtures("tuned_fresh")


def test_tuned_call_runs_the_winner_and_equals_the_builtin_composition(store_dir, rng):
    v = simd_variant(NSG=2, RPS=2, PW=2)
    write(store_dir, "qgemv_swiglu", {"N": 64, "K": 512, "G": 64}, "float32", v, ms=0.5, base_ms=1.0)
    args = weights(rng, 48, 512, mx.float32)  # the nearest tuned shape serves N=48
    assert f"variant {v.id}" in tuned.explain("qgemv_swiglu", *args, group_size=64)
    y = tuned.qgemv_swiglu(*args, group_size=64)
    assert y.shape == (1, 48) and y.dtype == mx.float32
    ref = composed(*args)
    err = float(mx.linalg.norm(y - ref) / mx.linalg.norm(ref))
    assert err < 3e-5, err
    assert tuned.fallbacks() == {}
    # a (1, 1, K) token keeps its leading dims, as the built-in does
    x3 = args[0].reshape(1, 1, 512)
    y3 = tuned.qgemv_swiglu(x3, *args[1:], group_size=64)
    assert y3.shape == (1, 1, 48)
    np.testing.assert_allclose(np.asarray(y3).ravel(), np.asarray(y).ravel(), rtol=1e-6, atol=1e-7)
    assert tuned.fallbacks() == {}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tuned_half_call_is_within_the_op_tolerance_of_its_reference(store_dir, rng, dtype):
    v = simd_variant(NSG=4, RPS=1, PW=4)
    write(store_dir, "qgemv_swiglu", {"N": 64, "K": 512, "G": 128}, dtype, v, ms=0.5, base_ms=1.0)
    args = weights(rng, 64, 512, getattr(mx, dtype), group_size=128)
    y = tuned.qgemv_swiglu(*args, group_size=128)
    assert tuned.fallbacks() == {} and y.dtype == getattr(mx, dtype)
    ref = OP.reference(*args)[0].astype(mx.float32)
    err = float(mx.linalg.norm(y.astype(mx.float32) - ref) / mx.linalg.norm(ref))
    assert err < OP.tolerance[dtype], err


def test_untuned_call_falls_back_to_the_builtin_with_a_reason(store_dir, rng):
    args = weights(rng, 40, 256, mx.float16)
    assert tuned.explain("qgemv_swiglu", *args).startswith("built-in: no stored qgemv_swiglu variant")
    y = tuned.qgemv_swiglu(*args)
    np.testing.assert_array_equal(np.asarray(y.astype(mx.float32)), np.asarray(composed(*args).astype(mx.float32)))
    assert sum(tuned.fallbacks().values()) == 1


def test_under_compile_the_call_still_matches_the_builtin(store_dir, rng):
    """Untuned, and tuned on the emulator (whose kernels run eagerly on the host): both run
    the built-in inside mx.compile, each counted with its reason."""
    args = weights(rng, 64, 512, mx.float32)
    f = mx.compile(lambda *a: tuned.qgemv_swiglu(*a, group_size=64))
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(composed(*args)), rtol=1e-6, atol=1e-7)
    assert any("no stored qgemv_swiglu variant" in why for _, why in tuned.fallbacks())
    tuned.refresh()
    write(store_dir, "qgemv_swiglu", {"N": 64, "K": 512, "G": 64}, "float32", simd_variant(), ms=0.5, base_ms=1.0)
    f = mx.compile(lambda *a: tuned.qgemv_swiglu(*a, group_size=64))
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(composed(*args)), rtol=1e-5, atol=1e-6)
    assert [why for _, why in tuned.fallbacks()] == ["the emulator's kernels cannot run inside mx.compile"]


def test_arguments_a_kernel_cannot_serve_fall_back_with_their_reason(store_dir, rng):
    # a winner for every dtype at this shape: only the arguments can send a call to the built-in
    for dtype in ("float32", "float16"):
        write(store_dir, "qgemv_swiglu", {"N": 64, "K": 512, "G": 64}, dtype, simd_variant(), ms=0.5, base_ms=1.0)
    x, wg, sg, bg, wu, su, bu = weights(rng, 64, 512, mx.float32)
    assert "variant" in tuned.explain("qgemv_swiglu", x, wg, sg, bg, wu, su, bu)

    two = mx.concatenate([x, 2 * x])
    assert "one token only (2 rows given)" in tuned.explain("qgemv_swiglu", two, wg, sg, bg, wu, su, bu)
    y = tuned.qgemv_swiglu(two, wg, sg, bg, wu, su, bu)  # served by the built-in, prefill-style
    np.testing.assert_allclose(np.asarray(y), np.asarray(composed(two, wg, sg, bg, wu, su, bu)), rtol=1e-6)

    q8 = weights(rng, 64, 512, mx.float32, bits=8)
    assert "bits=4" in tuned.explain("qgemv_swiglu", *q8, bits=8)
    np.testing.assert_allclose(np.asarray(tuned.qgemv_swiglu(*q8, bits=8)), np.asarray(composed(*q8, bits=8)), rtol=1e-6)

    g32 = weights(rng, 64, 512, mx.float32, group_size=32)
    assert "group_size in (64, 128)" in tuned.explain("qgemv_swiglu", *g32, group_size=32)
    np.testing.assert_allclose(np.asarray(tuned.qgemv_swiglu(*g32, group_size=32)),
                               np.asarray(composed(*g32, group_size=32)), rtol=1e-6)
    assert len(tuned.fallbacks()) == 3 and all(c == 1 for c in tuned.fallbacks().values())

    # arguments the built-in itself may refuse: the binding's reason, never a kernel launch
    half = [a.astype(mx.float16) for a in (sg, bg)]
    assert "share one dtype" in tuned.explain("qgemv_swiglu", x, wg, *half, wu, su, bu)
    assert "wg and wu must both be" in tuned.explain("qgemv_swiglu", x, wg, sg, bg, wu[:32], su[:32], bu[:32])
    assert "must be (64, 8)" in tuned.explain("qgemv_swiglu", x, wg, sg, bg, wu, su[:, :4], bu[:, :4])
    assert "scales and biases of every weight" in tuned.explain("qgemv_swiglu", x, wg, sg, bg, wu, su, None)
    assert "has no tuned kernels" in tuned.explain("qgemv_swiglu", x.astype(mx.int32), wg, sg, bg, wu, su, bu)


def test_emulator_check_of_a_sample_passes(store_dir):
    r = CliRunner().invoke(main, ["check", "qgemv_swiglu", "simd", "--sample", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output


# each a plausible slip in a fused kernel; the check must fail every one
BROKEN = {
    "silu of u, not g": ("y[row0 + r] = T(g / (1.0f + exp(-g)) * u);", "y[row0 + r] = T(u / (1.0f + exp(-u)) * g);"),
    "up row scaled by the gate's scales": ("au[r] += float(su[so])", "au[r] += float(sg[so])"),
    "last row of each simdgroup never written": ("row0 + r < N)", "row0 + r + 1 < N)"),
    "x sum left out of the up's biases": ("float(bu[so]) * xsum", "float(bu[so])"),
}


@pytest.mark.parametrize("why", BROKEN)
def test_a_broken_copy_of_the_template_is_caught(why, check_fails_on):
    check_fails_on("qgemv_swiglu", SIMD, *BROKEN[why], {"NSG": 2, "RPS": 2, "PW": 2}, "float16")


needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
@pytest.mark.parametrize("params", [
    dict(KS=1, RPT=2, TEAMS=4, PW=4, U=4, CS=1, XS=4096),   # the expected winner, x staged
    dict(KS=2, RPT=1, TEAMS=4, PW=8, U=1, CS=0, XS=0),      # split K: the shared-memory epilogue
], ids=["ks1-xs", "ks2"])
def test_the_cuda_template_compiles(params):
    t = next(t for t in templates.discover("qgemv_swiglu") if t.backend == "cuda")
    cuda_source.check_variant(variants.make(t, params), OP, "bfloat16")
