"""qgemv_add (a 4-bit gemv at decode + the residual add, one launch): the reference is the
built-in composition (the add bit for bit), the tuned call matches the built-in and refuses
what it cannot serve with a reason, the Metal template is proven on the emulator and a broken
copy of it is caught, the CUDA template compiles (a sample of its space, and the expected
winners), and `hlh_mlx guard` finds nothing in either.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""

import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import cuda_source, guard, ops, templates, tuned, variants
from hlh_mlx.cli import _params, main
from hlh_mlx.ops.qgemv_add import qgemv_add

from .conftest import ROOT, rel_error
from .test_tuned import write

OP = ops.get("qgemv_add")
DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SIMD_PATH = ROOT / "templates" / "qgemv_add" / "simd.metal.j2"
SIMD = SIMD_PATH.read_text()
CUDA = next(t for t in templates.discover("qgemv_add") if t.backend == "cuda")


def simd_variant(**params):
    t = next(t for t in templates.discover("qgemv_add") if t.family == "simd" and t.backend == "metal")
    return variants.make(t, params) if params else variants.expand(t)[0]


def weights(rng, n, k, dtype, group_size=64, bits=4):
    """x (1, K), w, scales, biases (mx.quantize), r (1, N): written out here, not the op's make_inputs."""
    x = mx.array(rng.standard_normal((1, k)).astype(np.float32)).astype(dtype)
    w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dtype)
    r = mx.array(rng.standard_normal((1, n)).astype(np.float32)).astype(dtype)
    return [x, *mx.quantize(w, group_size=group_size, bits=bits), r]


def composed(x, w, scales, biases, r, group_size=64, bits=4):
    """What a decoder block computes at decode (o_proj or down_proj, then the residual add)."""
    return r + mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)




pytestmark = pytest.mark.usefixtures("tuned_fresh")


# --- the op spec: reference against the built-in composition ----------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [{"N": 96, "K": 1024, "G": 64}, {"N": 37, "K": 2560, "G": 128}], ids=["g64", "g128"])
def test_reference_is_the_builtin_composition(rng, dtype, shape):
    args = OP.make_inputs(shape, DT[dtype], rng)
    x, w, s, b, r = args
    ref, = OP.reference(*args)
    fn = qgemv_add(*args, group_size=shape["G"])
    assert ref.shape == fn.shape == (1, shape["N"]) and ref.dtype == fn.dtype == DT[dtype]
    assert mx.array_equal(fn, OP.baseline(*args)[0]).item()  # what the sweep times is the function
    # the add: the dot rounded to the dtype, + r in float32, rounded once == the dtype's own add
    g = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=shape["G"], bits=4)
    assert mx.array_equal((g.astype(mx.float32) + r.astype(mx.float32)).astype(DT[dtype]), g + r).item()
    # the gemv: float32 within the tolerance; in half, MLX's CPU quantized_matmul accumulates
    # in the dtype (its own error grows with K: ~1e-2 in float16, ~8e-2 in bfloat16 at K=4096),
    # so there y may differ from the reference by that gemv's error, and by one rounding more
    w32 = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=shape["G"], bits=4)
    g_err = rel_error(g, x.astype(mx.float32) @ w32.T) * float(mx.linalg.norm(g.astype(mx.float32)))
    y_err = rel_error(fn, ref) * float(mx.linalg.norm(ref.astype(mx.float32)))
    y_tol = OP.tolerance[dtype] * float(mx.linalg.norm(ref.astype(mx.float32)))
    assert y_err <= (y_tol if dtype == "float32" else g_err + y_tol), (y_err, g_err, y_tol)
    # and the residual matters in the reference: dropping it is far outside the tolerance
    assert rel_error(OP.reference(x, w, s, b, mx.zeros_like(r))[0], ref) > 0.3


def test_magnitude_judges_a_cancelling_row_by_its_terms(rng):
    x, w, s, b, r = OP.make_inputs({"N": 8, "K": 256, "G": 64}, mx.float32, rng)
    ref, = OP.reference(x, w, s, b, r)
    cancel = -ref + r  # a residual that cancels the dot: y ~ 0
    mag, = OP.magnitude(x, w, s, b, cancel)
    assert float(mx.abs(OP.reference(x, w, s, b, cancel)[0]).max()) < 1e-5
    assert float(mx.min(mag)) > 0.1  # the products' and the residual's size, not |y|


# --- hlh_mlx.tuned: a kernel on the emulator, fallbacks with their reasons ----------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tuned_call_runs_the_winner_and_equals_the_builtin_composition(store_dir, rng, dtype):
    v = simd_variant(SG=2, RPS=2, PW=2)
    write(store_dir, "qgemv_add", {"N": 64, "K": 512, "G": 64}, dtype, v, ms=0.5, base_ms=1.0)
    args = weights(rng, 45, 512, DT[dtype])  # the nearest tuned shape serves N=45: a partial last simdgroup
    assert f"variant {v.id}" in tuned.explain("qgemv_add", *args, group_size=64)
    y = tuned.qgemv_add(*args, group_size=64)
    assert y.shape == (1, 45) and y.dtype == DT[dtype]
    assert tuned.fallbacks() == {}
    assert rel_error(y, OP.reference(*args)[0]) <= OP.tolerance[dtype], rel_error(y, OP.reference(*args)[0])
    if dtype == "float32":  # half: the CPU built-in accumulates in the dtype (see the reference test)
        assert rel_error(y, composed(*args)) <= OP.tolerance[dtype], rel_error(y, composed(*args))
    # a (1, 1, K) token with a (1, 1, N) residual keeps its leading dims, as the built-in does
    x, w, s, b, r = args
    y3 = tuned.qgemv_add(x.reshape(1, 1, 512), w, s, b, r.reshape(1, 1, 45), group_size=64)
    assert y3.shape == (1, 1, 45) and tuned.fallbacks() == {}
    assert mx.array_equal(y3.reshape(1, 45), y).item()
    # one token in attention's (1, heads, 1, head_dim) layout (o_proj's input) is read as the
    # row it is in memory: r's shape out, no view of x made
    y4 = tuned.qgemv_add(x.reshape(1, 8, 1, 64), w, s, b, r.reshape(1, 1, 45), group_size=64)
    assert y4.shape == (1, 1, 45) and tuned.fallbacks() == {}
    assert mx.array_equal(y4, y3).item()


def test_tuned_call_at_group_128(store_dir, rng):
    v = simd_variant(SG=4, RPS=1, PW=4)
    write(store_dir, "qgemv_add", {"N": 64, "K": 512, "G": 128}, "float16", v, ms=0.5, base_ms=1.0)
    args = weights(rng, 64, 640, mx.float16, group_size=128)
    y = tuned.qgemv_add(*args, group_size=128)
    assert tuned.fallbacks() == {}
    assert rel_error(y, OP.reference(*args)[0]) <= OP.tolerance["float16"]


def test_untuned_call_falls_back_to_the_builtin_with_a_reason(store_dir, rng):
    args = weights(rng, 40, 256, mx.float16)
    assert tuned.explain("qgemv_add", *args).startswith("built-in: no stored qgemv_add variant")
    y = tuned.qgemv_add(*args)
    assert mx.array_equal(y, composed(*args)).item()
    assert sum(tuned.fallbacks().values()) == 1
    # the built-in composition reads a token in attention's layout as its row too
    x, w, s, b, r = args
    y4 = tuned.qgemv_add(x.reshape(1, 4, 1, 64), w, s, b, r.reshape(1, 1, 40))
    assert y4.shape == (1, 1, 40) and mx.array_equal(y4.reshape(1, 40), y).item()


def test_under_compile_the_call_still_matches_the_builtin(store_dir, rng):
    args = weights(rng, 64, 512, mx.float32)
    f = mx.compile(lambda *a: tuned.qgemv_add(*a, group_size=64))
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(composed(*args)), rtol=1e-6, atol=1e-6)
    assert any("no stored qgemv_add variant" in why for _, why in tuned.fallbacks())
    tuned.refresh()
    write(store_dir, "qgemv_add", {"N": 64, "K": 512, "G": 64}, "float32", simd_variant(), ms=0.5, base_ms=1.0)
    f = mx.compile(lambda *a: tuned.qgemv_add(*a, group_size=64))
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(composed(*args)), rtol=1e-5, atol=1e-5)
    assert [why for _, why in tuned.fallbacks()] == ["the emulator's kernels cannot run inside mx.compile"]


def test_arguments_a_kernel_cannot_serve_fall_back_with_their_reason(store_dir, rng):
    # a winner for every dtype at this shape: only the arguments can send a call to the built-in
    for dtype in ("float32", "float16"):
        write(store_dir, "qgemv_add", {"N": 64, "K": 512, "G": 64}, dtype, simd_variant(), ms=0.5, base_ms=1.0)
    x, w, s, b, r = weights(rng, 64, 512, mx.float32)
    assert "variant" in tuned.explain("qgemv_add", x, w, s, b, r)

    # refusals the built-in serves: the call still answers as the composition, counted once each
    two = mx.concatenate([x, 2 * x])
    served = [
        ("one token only (2 rows given)", (two, w, s, b, r), {}),                   # prefill
        ("residual must have shape (1, 64)", (x, w, s, b, r[:, :1]), {}),  # a broadcast residual
        ("residual must be in x's dtype", (x, w, s, b, r.astype(mx.float16)), {}),  # promotion
        ("bits=4", tuple(weights(rng, 64, 512, mx.float32, bits=8)), {"bits": 8}),
        ("group_size in (64, 128)", tuple(weights(rng, 64, 512, mx.float32, group_size=32)), {"group_size": 32}),
    ]
    for why, args, kw in served:
        said = tuned.explain("qgemv_add", *args, **kw)
        assert said.startswith("built-in") and why in said, (why, said)
        got, want = tuned.qgemv_add(*args, **kw), composed(*args, **kw)
        assert got.shape == want.shape and got.dtype == want.dtype and mx.array_equal(got, want).item(), why
    assert len(tuned.fallbacks()) == len(served) and all(c == 1 for c in tuned.fallbacks().values())

    # arguments the built-in itself may refuse: the binding's reason, never a kernel launch
    refused = [
        ("share one dtype", (x, w, s.astype(mx.float16), b, r)),
        ("x's last dimension 512 is not w's K = 256", (x, w[:, :32], s, b, r)),
        ("nor is x one token of 512 values", (x.reshape(1, 8, 1, 64)[:, :4], w, s, b, r)),
        ("scales and biases must be (64, 8)", (x, w, s[:, :4], b[:, :4], r)),
        ("scales and biases of every weight are needed", (x, w, s, None, r)),
        ("has no tuned kernels", (x.astype(mx.int32), w, s, b, r)),
        ("not a multiple of the group size", (x[:, :96], w[:, :12], s[:, :2], b[:, :2], r)),
        ("residual must be an mx.array (got float)", (x, w, s, b, 1.0)),
    ]
    for why, args in refused:
        said = tuned.explain("qgemv_add", *args)
        assert said.startswith("built-in") and why in said, (why, said)
    # a token in attention's layout with a residual it cannot be a row of: the reason names r
    said = tuned.explain("qgemv_add", x.reshape(1, 8, 1, 64), w, s, b, mx.concatenate([r, r]))
    assert "residual's shape, which must then be (1, ..., 64) (got (2, 64))" in said, said
    # and the built-in composition leaves arguments it cannot read to MLX, whose error says why
    with pytest.raises(ValueError):
        tuned.qgemv_add(x, w.reshape(-1), s, b, r)
    # and the good call runs the kernel
    n = sum(tuned.fallbacks().values())
    assert rel_error(tuned.qgemv_add(x, w, s, b, r), composed(x, w, s, b, r)) < 2e-5
    assert sum(tuned.fallbacks().values()) == n


# --- the Metal template on the emulator --------------------------------------------------

def test_emulator_check_of_a_sample_passes(store_dir):
    r = CliRunner().invoke(main, ["check", "qgemv_add", "simd", "--sample", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output  # 2 variants x 3 dtypes, sanitizer on, edge shapes too


# each a plausible slip in a fused epilogue or the gemv; the check must fail every one
BROKEN = {
    "residual left out": ("T(float(T(s)) + float(residual[row0 + r]))", "T(s)"),
    "residual of the wrong row": ("float(residual[row0 + r])", "float(residual[row0])"),
    "residual added twice": ("T(float(T(s)) + float(residual[row0 + r]))",
                             "T(float(T(s)) + 2.0f * float(residual[row0 + r]))"),
    "last row of each simdgroup never written": ("lane == 0 && row0 + r < N)", "lane == 0 && row0 + r + 1 < N)"),
    "x sum left out of the biases": ("float(biases[size_t(row) * NG + g]) * xsum", "float(biases[size_t(row) * NG + g])"),
}


@pytest.mark.parametrize("why", BROKEN)
def test_a_broken_copy_of_the_template_is_caught(why, check_fails_on):
    check_fails_on("qgemv_add", SIMD, *BROKEN[why], {"SG": 2, "RPS": 2, "PW": 2}, "float16")


# --- the CUDA template: its expect names a real variant; it compiles ---------------------

def expected_winners():
    """Every `KEY=V,...` run in the CUDA template's expect, first the expected winner."""
    return re.findall(r"\b(?:[A-Z]+=\d+,)+[A-Z]+=\d+\b", CUDA.expect)


def test_expect_names_the_winner_first_as_sweep_variant_text():
    picks = expected_winners()
    assert CUDA.expect.startswith(picks[0])
    down = {"N": 4096, "K": 14336, "G": 64}  # Llama-3-8B down_proj + residual
    for text in picks:
        v = variants.make(CUDA, _params(CUDA, text.split(",")))  # a valid variant of the space
        assert set(v.param_dict) == set(CUDA.params), text
    first = variants.make(CUDA, _params(CUDA, picks[0].split(",")))
    assert first.param_dict["KS"] > 1  # K=14336 over N=4096 rows wants split K
    assert all(e(**{**first.param_dict, **down}) for e in CUDA.requires.values())  # it serves that shape


def test_the_cuda_space_is_small():
    assert 20 <= len(variants.expand(CUDA)) <= 100


needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
def test_a_sample_of_the_cuda_space_compiles():
    sample = variants.sample(variants.expand(CUDA), 20, seed=11)
    picks = [variants.make(CUDA, _params(CUDA, t.split(","))) for t in expected_winners()]
    todo = list({v.id: v for v in picks + sample}.values())
    assert len(todo) >= 20
    # each variant in one dtype, rotating, so all three are compiled
    cuda_source.check_variants([(v, ("float16", "bfloat16", "float32")[int(v.id, 16) % 3], None) for v in todo], OP)


# --- guard ---------------------------------------------------------------------------------

def test_guard_finds_nothing():
    paths = [ROOT / "templates" / "qgemv_add", ROOT / "hlh_mlx" / "ops" / "qgemv_add.py"]
    found = guard.scan(paths)
    assert [f for f in found if f.blocking] == []
    # off a GPU the CUDA template's variants are noted as not run, nothing else
    assert {f.kind for f in found} <= {"not-run"}
    r = CliRunner().invoke(main, ["guard", *map(str, paths)])
    assert r.exit_code == 0 and "guard: 0 finding(s)" in r.output, r.output
