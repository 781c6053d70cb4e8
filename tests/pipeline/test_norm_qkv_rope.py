"""norm_qkv_rope (rms_norm + q/k/v 4-bit gemvs + RoPE of q and k, one token, in one launch):
the reference agrees with the built-in composition and with RoPE written out by hand; the
tuned call runs a variant on the emulator with the offset as data (one plan, two offsets),
refuses what the kernels do not serve with a reason; the checker proves the Metal template
and catches broken copies; a sample of the CUDA space compiles under nvcc.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""

import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import check, cuda_source, ops, templates, tuned, variants
from hlh_mlx.cli import main
from hlh_mlx.ops.norm_qkv_rope import norm_qkv_rope, rope_freqs

from .conftest import ROOT, rel_error
from .test_tuned import write

NAME = "norm_qkv_rope"
OP = ops.get(NAME)
DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SIMD = (ROOT / "templates" / NAME / "simd.metal.j2").read_text()
# the emulator shapes: D=32 (GQA 2:1) and D=128 (one q head per k head)
# the emulator shapes: D=32 (GQA 2:1), no biases (Llama); D=128 (one q head per k head) with
# q/k/v biases (Qwen2)
S32 = {"NQ": 64, "NK": 32, "K": 512, "G": 64, "D": 32, "B": 0}
S128 = {"NQ": 128, "NK": 128, "K": 256, "G": 128, "D": 128, "B": 1}


def template(backend):
    return next(t for t in templates.discover(NAME) if t.backend == backend)


def simd_variant(**params):
    return variants.make(template("metal"), params) if params else variants.expand(template("metal"))[0]


def args_for(rng, nq, nk, k, d, dtype, group_size=64, bits=4, base=10000.0):
    """The function's arguments before offset and head_dim: x, norm_w, eps, 3 x (w, s, b), freqs."""
    dt = DT[dtype] if isinstance(dtype, str) else dtype
    x = mx.array(rng.standard_normal((1, k)).astype(np.float32)).astype(dt)
    norm_w = mx.array((1 + 0.2 * rng.standard_normal(k)).astype(np.float32)).astype(dt)
    out = [x, norm_w, 1e-5]
    for n in (nq, nk, nk):
        w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dt)
        out += list(mx.quantize(w, group_size=group_size, bits=bits))
    return out + [rope_freqs(d, base)]


def biases_for(rng, nq, nk, dtype):
    """q_bias, k_bias, v_bias as keywords (Qwen2's projections carry them)."""
    dt = DT[dtype] if isinstance(dtype, str) else dtype
    return {f"{n}_bias": mx.array(rng.standard_normal(m).astype(np.float32)).astype(dt)
            for n, m in (("q", nq), ("k", nk), ("v", nk))}


def composed(x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs, offset, head_dim, group_size=64, bits=4,
             q_bias=None, k_bias=None, v_bias=None):
    """What mlx-lm's Llama (no biases) or Qwen2 (biases) attention computes at decode, written
    out here, not taken from the op."""
    h = mx.fast.rms_norm(x, norm_w, eps)
    q, k, v = (mx.quantized_matmul(h, w, s, b, transpose=True, group_size=group_size, bits=bits)
               for w, s, b in ((wq, sq, bq), (wk, sk, bk), (wv, sv, bv)))
    if q_bias is not None:
        q, k, v = q + q_bias, k + k_bias, v + v_bias
    q = mx.fast.rope(q.reshape(1, -1, 1, head_dim), head_dim, traditional=False, base=None, scale=1.0,
                     offset=offset, freqs=freqs).reshape(1, -1)
    k = mx.fast.rope(k.reshape(1, -1, 1, head_dim), head_dim, traditional=False, base=None, scale=1.0,
                     offset=offset, freqs=freqs).reshape(1, -1)
    return q, k, v


def kernel_inputs(a, offset, biases=None):
    """The op's inputs (what the reference and a kernel take) from the function's arguments."""
    x, norm_w, eps, *w, freqs = a
    b = biases or {f"{n}_bias": mx.zeros((m.shape[0],), x.dtype) for n, m in zip("qkv", w[::3])}
    return [x, norm_w, mx.array([eps], dtype=mx.float32), *w, freqs, mx.array([offset], dtype=mx.int32),
            b["q_bias"], b["k_bias"], b["v_bias"]]




pytestmark = pytest.mark.usefixtures("tuned_fresh")


# ---- the op: reference, built-in, semantics ----

@pytest.mark.parametrize("with_biases", [False, True], ids=["llama", "qwen2"])
def test_the_function_is_the_builtin_composition(rng, with_biases):
    a = args_for(rng, 128, 64, 256, 64, "float16")
    b = biases_for(rng, 128, 64, "float16") if with_biases else {}
    for offset in (7, mx.array([7], dtype=mx.int32)):  # an int, or an array as mx.fast.rope takes
        got = norm_qkv_rope(*a, offset, 64, **b)
        want = composed(*a, offset, 64, **b)
        assert isinstance(got, tuple) and len(got) == 3
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype and mx.array_equal(g, w).item()
    if with_biases:  # they are added: without them the answer differs
        assert not mx.array_equal(norm_qkv_rope(*a, 7, 64)[2], got[2]).item()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_reference_agrees_with_the_builtin_composition(rng, d, dtype):
    nq, nk, k = 4 * d, 2 * d, 512
    a = args_for(rng, nq, nk, k, d, dtype)
    b = biases_for(rng, nq, nk, dtype) if d == 128 else None  # with and without biases
    inputs = kernel_inputs(a, 1234, b)
    ref = OP.reference(*inputs)
    got = composed(*a, 1234, d, **(b or {}))
    assert [r.shape for r in ref] == [(1, nq), (1, nk), (1, nk)] and all(r.dtype == DT[dtype] for r in ref)
    # float32: the same float32 math in another order. Half: MLX's CPU quantized_matmul sums in
    # the half type (qgemv's own built-in is 2.8e-3 / 2.6e-2 off its float32 reference here), so
    # the built-in is the less exact side; a wrong rotation or a missing norm is O(1) off.
    bound = {"float32": 1e-5, "float16": 1.2e-2, "bfloat16": 8e-2}[dtype]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert rel_error(g, r) < bound, (i, rel_error(g, r))
    # the offset matters: at offset 0 q and k are not rotated, at 1234 they are
    assert rel_error(OP.reference(*kernel_inputs(a, 0, b))[0], ref[0]) > 0.3


@pytest.mark.parametrize("d", [64, 128])
def test_the_reference_rotates_as_written_in_numpy(rng, d):
    """RoPE non-traditional, by hand: element i < D/2 of a head pairs with i + D/2, angle
    offset / freqs[i], freqs[i] = base ** (2i / D); v is not rotated."""
    a = args_for(rng, 2 * d, d, 256, d, "float32", base=500.0)
    offset = 37
    q, k, v = OP.reference(*kernel_inputs(a, offset))
    x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs = a
    xn = np.asarray(x, dtype=np.float64)
    h = xn / np.sqrt(np.mean(xn * xn) + eps) * np.asarray(norm_w, dtype=np.float64)
    half = d // 2
    theta = offset / (500.0 ** (2 * np.arange(half) / d))
    c, s = np.cos(theta), np.sin(theta)
    for got, (w, sc, bi), rotate in ((q, (wq, sq, bq), True), (k, (wk, sk, bk), True), (v, (wv, sv, bv), False)):
        plain = h @ np.asarray(mx.dequantize(w, sc, bi, group_size=64, bits=4), dtype=np.float64).T
        if rotate:
            p = plain.reshape(-1, 2, half)
            a_, b_ = p[:, 0], p[:, 1]
            plain = np.stack([a_ * c - b_ * s, a_ * s + b_ * c], axis=1).reshape(1, -1)
        g = np.asarray(got, dtype=np.float64)
        assert np.linalg.norm(g - plain) / np.linalg.norm(plain) < 1e-5


# ---- the tuned call on the emulator ----

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [S32, S128], ids=["D32", "D128"])
def test_a_tuned_variant_serves_every_offset_from_one_plan(store_dir, rng, dtype, shape):
    v = simd_variant(NSG=2, PW=2)
    write(store_dir, NAME, shape, dtype, v, ms=0.5, base_ms=1.0)
    g, d = shape["G"], shape["D"]
    a = args_for(rng, shape["NQ"], shape["NK"], shape["K"], d, dtype, group_size=g)
    b = biases_for(rng, shape["NQ"], shape["NK"], dtype) if shape["B"] else {}
    assert f"variant {v.id}" in tuned.explain(NAME, *a, offset=5, head_dim=d, group_size=g, **b)
    results = {}
    for offset in (5, 301):  # the offset travels as data: both calls run the same plan
        got = tuned.norm_qkv_rope(*a, offset=offset, head_dim=d, group_size=g, **b)
        assert isinstance(got, tuple) and len(got) == 3
        assert [t.shape for t in got] == [(1, shape["NQ"]), (1, shape["NK"]), (1, shape["NK"])]
        assert all(t.dtype == DT[dtype] for t in got)
        inputs = kernel_inputs(a, offset, b or None)
        ok, err, _, why = check.compare(list(got), OP.reference(*inputs), OP.tolerance[dtype], OP.magnitude(*inputs))
        assert ok, (offset, why)
        results[offset] = got
    assert len(tuned.norm_qkv_rope.plans) == 1
    assert tuned.fallbacks() == {}
    # two offsets, two rotations of the same q and k; v is the same
    assert rel_error(results[5][0], results[301][0]) > 0.1
    assert mx.array_equal(results[5][2], results[301][2]).item()
    # an offset array (as mx.fast.rope takes one) runs the kernel too, the value read on the device
    arr = tuned.norm_qkv_rope(*a, mx.array([301], dtype=mx.int32), d, group_size=g, **b)
    for x, y in zip(arr, results[301]):
        assert mx.array_equal(x, y).item()
    assert tuned.fallbacks() == {}


def test_a_token_in_and_heads_first_out_take_no_views(store_dir, rng):
    """A model's (1, 1, K) token goes in as it is, and with heads_first q, k and v come out
    (1, heads, 1, D), the layout attention takes, from the kernel itself (the Metal template
    on the emulator) and from the built-in alike, with the values of the flat call."""
    v = simd_variant(NSG=2, PW=2)
    write(store_dir, NAME, S32, "float32", v, ms=0.5, base_ms=1.0)
    d, g = S32["D"], S32["G"]
    a = args_for(rng, S32["NQ"], S32["NK"], S32["K"], d, "float32", group_size=g)
    flat = tuned.norm_qkv_rope(*a, offset=7, head_dim=d, group_size=g)
    x3 = a[0].reshape(1, 1, -1)
    got = tuned.norm_qkv_rope(x3, *a[1:], offset=7, head_dim=d, group_size=g, heads_first=True)
    assert [t.shape for t in got] == [(1, S32["NQ"] // d, 1, d), (1, S32["NK"] // d, 1, d), (1, S32["NK"] // d, 1, d)]
    assert tuned.fallbacks() == {}
    for h, f in zip(got, flat):
        assert mx.array_equal(h.reshape(f.shape), f).item()
    builtin = norm_qkv_rope(x3, *a[1:], 7, d, group_size=g, heads_first=True)
    assert [t.shape for t in builtin] == [t.shape for t in got]
    for h, b in zip(got, builtin):
        np.testing.assert_allclose(np.asarray(h), np.asarray(b), rtol=1e-4, atol=1e-4)
    assert OP.bind(*a, 7, d, group_size=g, heads_first="yes") == "heads_first must be True or False (got 'yes')"


def test_untuned_the_builtin_runs_and_says_why(store_dir, rng):
    a = args_for(rng, 128, 64, 256, 64, "float16")
    assert tuned.explain(NAME, *a, offset=3, head_dim=64).startswith("built-in: no stored norm_qkv_rope variant")
    got = tuned.norm_qkv_rope(*a, offset=3, head_dim=64)
    for g, w in zip(got, composed(*a, 3, 64)):
        assert mx.array_equal(g, w).item()
    assert sum(tuned.fallbacks().values()) == 1


def test_arguments_the_kernels_do_not_serve_are_refused_with_the_reason(store_dir, rng):
    v = simd_variant()
    for dtype in ("float32", "float16"):
        write(store_dir, NAME, S32, dtype, v, ms=0.5, base_ms=1.0)
    a = args_for(rng, 64, 32, 512, 32, "float32")
    x, norm_w, eps, wq, sq, bq, wk, sk, bk, wv, sv, bv, freqs = a

    def why(*args, offset=3, head_dim=32, **kw):
        return tuned.explain(NAME, *args, offset=offset, head_dim=head_dim, **kw)
    assert f"variant {v.id}" in why(*a)

    a8 = args_for(rng, 64, 32, 512, 32, "float32", bits=8)
    assert "bits=4" in why(*a8, bits=8)
    a32 = args_for(rng, 64, 32, 512, 32, "float32", group_size=32)
    assert "group_size in (64, 128)" in why(*a32, group_size=32)
    # served by the built-in, with its answer
    for args, kw in ((a8, {"bits": 8}), (a32, {"group_size": 32})):
        got = tuned.norm_qkv_rope(*args, offset=3, head_dim=32, **kw)
        for g, w in zip(got, composed(*args, 3, 32, **kw)):
            assert mx.array_equal(g, w).item()

    two = mx.concatenate([x, 2 * x])
    assert "one token only (2 rows given)" in why(two, *a[1:])
    assert "head_dim must be even" in why(*a, head_dim=31)
    assert "head_dim 48 must divide" in why(*a[:-1], rope_freqs(48), head_dim=48)
    assert "freqs must be (16,) float32" in why(*a[:-1], rope_freqs(64))
    assert "freqs must be (16,) float32" in why(*a[:-1], freqs.astype(mx.float16))
    assert "must share one dtype" in why(x, norm_w.astype(mx.float16), *a[2:])
    assert "must share one dtype" in why(*a[:3], wq, sq.astype(mx.float16), *a[5:])
    assert "v and k must have the same rows" in why(*a[:9], wv[:16], sv[:16], bv[:16], freqs)
    assert "norm_w must be (512,)" in why(x, norm_w[:256], *a[2:])
    assert "wq must be (64, 64) uint32" in why(*a[:3], wq[:, :32], *a[4:])
    assert "wk's scales and biases must be (32, 8)" in why(*a[:7], sk[:, :4], bk[:, :4], *a[9:])
    assert "scales and biases of every weight" in why(*a[:11], None, freqs)
    assert "eps must be a number" in why(x, norm_w, -1.0, *a[3:])
    assert "offset of dtype" in why(*a, offset=mx.array([3.0]))
    assert "one offset" in why(*a, offset=mx.array([3, 4], dtype=mx.int32))
    assert "exact float32 range" in why(*a, offset=2 ** 24)
    assert "has no tuned kernels" in why(x.astype(mx.int32), *a[1:])
    b = biases_for(rng, 64, 32, "float32")
    assert "k_bias must be (32,) in x's dtype" in why(*a, **{**b, "k_bias": b["k_bias"][:16]})
    assert "v_bias must be (32,) in x's dtype" in why(*a, **{**b, "v_bias": b["v_bias"].astype(mx.float16)})
    # biases make another call (B=1): no variant is stored for it here, the built-in serves it
    assert "no stored norm_qkv_rope variant" in why(*a, **b)
    assert "tuned only with other settings of B, at 64x32x512x64x32x0" in why(*a, **b)
    assert len(tuned.fallbacks()) == 2 and all(c == 1 for c in tuned.fallbacks().values())


# ---- the templates ----

def test_emulator_check_of_a_sample_passes(store_dir):
    r = CliRunner().invoke(main, ["check", NAME, "simd", "--sample", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output


# each a plausible slip in this fused kernel; the check must fail every one
BROKEN = {
    "rotation the other way": ("T oa2 = T(a * c - b * s), ob2 = T(a * s + b * c);",
                               "T oa2 = T(a * c + b * s), ob2 = T(b * c - a * s);"),
    "offset ignored": ("float(offset[0]) * (1.0f / freqs[i])", "1.0f * (1.0f / freqs[i])"),
    "freqs taken as inverse frequencies": ("(1.0f / freqs[i])", "freqs[i]"),
    "pairs (2i, 2i+1), the traditional layout": ("ra = (u / HALF) * D + i;\n    rb = ra + HALF;",
                                                 "ra = (u / HALF) * D + 2 * i;\n    rb = ra + 1;"),
    "mean of x^2 over K + 1": ("/ float(K) + eps[0]);", "/ float(K + 1) + eps[0]);"),
    "norm weight left out": ("* inv * float(norm_w[e])", "* inv"),
    "k rows read from wq": ("(which == 1 ? wk[oa + p]", "(which == 1 ? wq[oa + p]"),
    "last v row never written": ("if (unit >= NP + NK) return;", "if (unit + 1 >= NP + NK) return;"),
    "k rotated with q's bias": ("float(which == 0 ? q_bias[rb] : k_bias[rb])", "float(q_bias[rb])"),
    "v's bias left out": ("v[ra] = QB ? T(float(T(aa)) + float(v_bias[ra])) : T(aa);", "v[ra] = T(aa);"),
}


@pytest.mark.parametrize("slip", BROKEN)
def test_a_broken_copy_of_the_template_is_caught(slip, check_fails_on):
    check_fails_on(NAME, SIMD, *BROKEN[slip], {"NSG": 2, "PW": 2}, "float32")


def test_guard_finds_nothing_in_the_ops_files():
    r = CliRunner().invoke(main, ["guard", str(ROOT / "templates" / NAME), str(ROOT / "hlh_mlx" / "ops" / f"{NAME}.py")])
    assert r.exit_code == 0, r.output


def expected_winner():
    text = template("cuda").expect
    m = re.match(r"\s*((?:[A-Z]+=\d+,?)+)", text)
    assert m, "the expect text must open with the winner's KEY=V,... (for sweep --variant)"
    return {k: int(v) for k, v in (p.split("=") for p in m.group(1).strip(",").split(","))}


def test_the_cuda_space_is_small_and_its_expected_winner_serves_llama3_8b():
    t = template("cuda")
    space = variants.expand(t)
    assert 20 <= len(space) <= 130, len(space)  # 60 plans, each with either sin/cos (TRIG)
    win = variants.make(t, expected_winner())
    for g in (64, 128):
        assert win.supports({"NQ": 4096, "NK": 1024, "K": 4096, "G": g, "D": 128, "B": 0}, "float16")
    assert sum(v.supports(OP.shapes[0], "float16") for v in space) >= 20


needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
def test_a_sample_of_the_cuda_space_compiles():
    """20 variants (the expected winner, split-K with h staged, and a seeded sample), each in
    one of the three dtypes in turn, compiled as MLX wraps them."""
    t = template("cuda")
    space = variants.expand(t)
    first = [variants.make(t, expected_winner()),
             variants.make(t, dict(KS=4, RPT=2, TEAMS=2, U=2, XS=2048, TRIG=32)),
             variants.make(t, dict(KS=1, RPT=2, TEAMS=4, U=4, XS=0, TRIG=64))]
    rest = [v for v in variants.sample(space, 30, seed=11) if v.id not in {f.id for f in first}]
    chosen = (first + rest)[:20]
    assert len({v.id for v in chosen}) == 20
    cuda_source.check_variants([(v, ("float16", "bfloat16", "float32")[i % 3], None) for i, v in enumerate(chosen)], OP)
