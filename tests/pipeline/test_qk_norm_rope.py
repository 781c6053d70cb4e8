"""qk_norm_rope (Qwen3's per-head query and key norms, then RoPE, one token, in one launch):
the function is what mlx-lm's Qwen3 attention computes, the reference agrees with it and
with the norm and rotation written out in float64; the tuned call runs a variant on the
emulator with the offset as data (one plan, two offsets), in the layout it is given, and
refuses what the kernels do not serve with a reason; the checker proves the Metal template
and catches broken copies.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import check, ops, templates, tuned, variants
from hlh_mlx.cli import main
from hlh_mlx.ops.norm_qkv_rope import rope_freqs
from hlh_mlx.ops.qk_norm_rope import qk_norm_rope

from .conftest import ROOT, rel_error
from .test_tuned import write

NAME = "qk_norm_rope"
OP = ops.get(NAME)
DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
HEADS = (ROOT / "templates" / NAME / "heads.metal.j2").read_text()
S32 = {"NQ": 128, "NK": 64, "D": 32}     # GQA 2:1
S128 = {"NQ": 256, "NK": 256, "D": 128}  # one q head per k head

pytestmark = pytest.mark.usefixtures("tuned_fresh")


def heads_variant(**params):
    t = next(t for t in templates.discover(NAME) if t.backend == "metal")
    return variants.make(t, params) if params else variants.expand(t)[0]


def args_for(rng, nq, nk, d, dtype, eps=1e-6, base=1000000.0):
    """The function's arguments before offset and head_dim: q, k, both norm weights, eps, freqs."""
    dt = DT[dtype]
    q, k = (mx.array((rng.standard_normal((1, n)) * 2).astype(np.float32)).astype(dt) for n in (nq, nk))
    wq, wk = (mx.array((1 + 0.3 * rng.standard_normal(d)).astype(np.float32)).astype(dt) for _ in range(2))
    return [q, k, wq, wk, eps, rope_freqs(d, base)]


def kernel_inputs(a, offset):
    q, k, wq, wk, eps, freqs = a
    return [q, k, wq, wk, mx.array([eps], dtype=mx.float32), freqs, mx.array([offset], dtype=mx.int32)]


def qwen3(q, k, wq, wk, eps, base, offset, d):
    """What mlx-lm's Qwen3 attention does to one token's q and k, with MLX's own modules:
    nn.RMSNorm over (B, L, heads, D), the transpose to (B, heads, L, D), nn.RoPE."""
    qn, kn = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
    qn.weight, kn.weight = wq, wk
    rope = nn.RoPE(d, traditional=False, base=base)
    out = []
    for t, norm in ((q, qn), (k, kn)):
        h = norm(t.reshape(1, 1, -1, d)).transpose(0, 2, 1, 3)
        out.append(rope(h, offset=offset))
    return out


# ---- the op: function, reference ----

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_function_is_what_a_qwen3_attention_computes(rng, dtype):
    d, base, offset = 64, 1000000.0, 37
    a = args_for(rng, 256, 128, d, dtype, base=base)
    got = qk_norm_rope(*a, offset, d)
    want = qwen3(*a[:5], base, offset, d)
    assert [t.shape for t in got] == [(1, 256), (1, 128)] and all(t.dtype == DT[dtype] for t in got)
    for g, w in zip(got, want):  # freqs= turns what base= does (rope_freqs is tested in test_blocks_fused)
        assert rel_error(g, w.reshape(g.shape)) < (1e-5 if dtype == "float32" else 2e-3)
    # heads first in, heads first out: the same values
    hf = qk_norm_rope(a[0].reshape(1, -1, 1, d), a[1].reshape(1, -1, 1, d), *a[2:], offset, d)
    assert [t.shape for t in hf] == [(1, 4, 1, d), (1, 2, 1, d)]
    for h, g in zip(hf, got):
        assert mx.array_equal(h.reshape(g.shape), g).item()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_reference_is_the_builtin_within_the_tolerance(rng, dtype):
    for shape in (S32, S128, *OP.edge_shapes):
        inputs = OP.make_inputs(shape, DT[dtype], rng)
        ok, err, _, why = check.compare(OP.baseline(*inputs), OP.reference(*inputs), OP.tolerance[dtype])
        assert ok, (shape, why)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_references_norm_is_mlx_rms_norm_bit_for_bit(rng, dtype):
    """MLX rounds x * rsqrt(...) to the dtype before the weight (a second rounding): the
    reference does too, so the op's heads are the built-in's (but for the sum's order)."""
    from hlh_mlx.ops.qk_norm_rope import _normed
    for shape in (S32, S128, *OP.edge_shapes):
        q, _, wq, _, eps, _, _ = OP.make_inputs(shape, DT[dtype], rng)
        d = shape["D"]
        want = mx.fast.rms_norm(q.reshape(1, -1, d), wq, eps.item()).reshape(1, -1)
        assert mx.array_equal(_normed(q, wq, eps), want).item(), shape


def test_the_reference_is_the_norm_and_rotation_written_out(rng):
    """float64 by hand: each head divided by its own rms, times its weight, then pair i and
    i + D/2 turned by offset / freqs[i]."""
    d, offset = 32, 301
    q, k, wq, wk, eps, freqs = args_for(rng, 96, 32, d, "float32", eps=0.5, base=100.0)
    got = OP.reference(*kernel_inputs([q, k, wq, wk, eps, freqs], offset))
    theta = offset / np.asarray(freqs, dtype=np.float64)
    c, s = np.cos(theta), np.sin(theta)
    for t, w, g in ((q, wq, got[0]), (k, wk, got[1])):
        h = np.asarray(t, dtype=np.float64).reshape(-1, d)
        h = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + eps) * np.asarray(w, dtype=np.float64)
        a_, b_ = h[:, :d // 2], h[:, d // 2:]
        want = np.concatenate([a_ * c - b_ * s, a_ * s + b_ * c], axis=1).reshape(1, -1)
        assert np.linalg.norm(np.asarray(g) - want) / np.linalg.norm(want) < 1e-5


def test_every_head_is_normed_by_its_own_rms(rng):
    """Scaling one head scales nothing after the norm (up to eps), and leaves the others as
    they were: a kernel that normed over all of q would change every head."""
    d = 32
    q, k, wq, wk, _, freqs = args_for(rng, 128, 64, d, "float32")
    base = OP.reference(*kernel_inputs([q, k, wq, wk, 1e-6, freqs], 9))[0]
    scaled = mx.concatenate([q[:, :d] * 10, q[:, d:]], axis=1)
    got = OP.reference(*kernel_inputs([scaled, k, wq, wk, 1e-6, freqs], 9))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=1e-5, atol=1e-5)


# ---- the tuned call on the emulator ----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [S32, S128], ids=["D32", "D128"])
def test_a_tuned_variant_serves_every_offset_from_one_plan(store_dir, rng, dtype, shape):
    v = heads_variant(NSG=2, REG=1)
    write(store_dir, NAME, shape, dtype, v, ms=0.5, base_ms=1.0)
    d = shape["D"]
    a = args_for(rng, shape["NQ"], shape["NK"], d, dtype)
    assert f"variant {v.id}" in tuned.explain(NAME, *a, offset=5, head_dim=d)
    results = {}
    for offset in (5, 301):  # the offset travels as data: both calls run the same plan
        got = tuned.qk_norm_rope(*a, offset=offset, head_dim=d)
        assert isinstance(got, tuple) and [t.shape for t in got] == [(1, shape["NQ"]), (1, shape["NK"])]
        assert all(t.dtype == DT[dtype] for t in got)
        ok, err, _, why = check.compare(list(got), OP.reference(*kernel_inputs(a, offset)), OP.tolerance[dtype])
        assert ok, (offset, why)
        results[offset] = got
    assert len(tuned.qk_norm_rope.plans) == 1
    assert tuned.fallbacks() == {}
    assert rel_error(results[5][0], results[301][0]) > 0.1
    # an offset array runs the kernel too, its value read on the device
    arr = tuned.qk_norm_rope(*a, mx.array([301], dtype=mx.int32), d)
    for x, y in zip(arr, results[301]):
        assert mx.array_equal(x, y).item()
    # heads first in (what norm_qkv_rope hands a patched block), heads first out, same values
    hf = tuned.qk_norm_rope(a[0].reshape(1, -1, 1, d), a[1].reshape(1, -1, 1, d), *a[2:], offset=301, head_dim=d)
    assert [t.shape for t in hf] == [(1, shape["NQ"] // d, 1, d), (1, shape["NK"] // d, 1, d)]
    for x, y in zip(hf, results[301]):
        assert mx.array_equal(x.reshape(y.shape), y).item()
    assert tuned.fallbacks() == {}


def test_untuned_the_builtin_runs_and_says_why(rng):
    a = args_for(rng, 128, 64, 32, "float16")
    assert tuned.explain(NAME, *a, offset=3, head_dim=32).startswith("built-in: no stored qk_norm_rope variant")
    got = tuned.qk_norm_rope(*a, offset=3, head_dim=32)
    for g, w in zip(got, qk_norm_rope(*a, 3, 32)):
        assert mx.array_equal(g, w).item()
    assert sum(tuned.fallbacks().values()) == 1


def test_arguments_the_kernels_do_not_serve_are_refused_with_the_reason(store_dir, rng):
    write(store_dir, NAME, S32, "float32", heads_variant(), ms=0.5, base_ms=1.0)
    a = args_for(rng, 128, 64, 32, "float32")
    q, k, wq, wk, eps, freqs = a

    def why(*args, offset=3, head_dim=32):
        return tuned.explain(NAME, *args, offset=offset, head_dim=head_dim)
    assert "variant" in why(*a) and why(*a).startswith("variant")
    assert "q's last dimension 100 is not whole heads of 32" in why(q[:, :100], *a[1:])
    assert "q's last dimension 128 is not whole heads of 48" in why(*a[:-1], rope_freqs(48), head_dim=48)
    assert "k's last dimension 40 is not whole heads of 16" in why(q, k[:, :40], *a[2:], head_dim=16)
    assert "head_dim must be an even int" in why(*a, head_dim=31)
    assert "empty or 0-d input" in why(q[0, 0], *a[1:])
    with pytest.raises(ValueError, match=r"\[qk_norm_rope\] head_dim must be an even int >= 2 \(got 32.0\)"):
        tuned.qk_norm_rope(*a, offset=3, head_dim=32.0)  # refused by bind, then by the built-in itself
    assert "q holds 2 sequences" in why(mx.concatenate([q, q]), *a[1:])
    assert "one token of one sequence" in why(q.reshape(1, 2, 64), *a[1:])
    assert "q_norm_w must be (32,)" in why(q, k, wq[:16], *a[3:])
    assert "must share one dtype" in why(q, k, wq.astype(mx.float16), *a[3:])
    assert "has no tuned kernels" in why(q.astype(mx.int32), k.astype(mx.int32), wq.astype(mx.int32),
                                         wk.astype(mx.int32), *a[4:])
    assert "eps must be a number" in why(*a[:4], -1.0, freqs)
    assert "freqs must be (16,) float32" in why(*a[:5], freqs.astype(mx.float16))
    assert "offset of dtype" in why(*a, offset=mx.array([3.0]))
    assert "one offset" in why(*a, offset=mx.array([3, 4], dtype=mx.int32))
    assert "exact float32 range" in why(*a, offset=2 ** 24)
    # each refused call is served by the built-in, with its answer
    got = tuned.qk_norm_rope(mx.concatenate([q, q]), *a[1:], offset=3, head_dim=32)
    for g, w in zip(got, qk_norm_rope(mx.concatenate([q, q]), *a[1:], 3, 32)):
        assert mx.array_equal(g, w).item()


# ---- the templates ----

def test_emulator_check_of_a_sample_passes(store_dir):
    r = CliRunner().invoke(main, ["check", NAME, "heads", "--sample", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "6 passed, 0 failed" in r.output


# each a plausible slip in this kernel; the check must fail every one
BROKEN = {
    "rotation the other way": ("dst[base + i] = T(a * c - b * s);", "dst[base + i] = T(a * c + b * s);"),
    "offset ignored": ("float pos = float(offset[0]);", "float pos = 1.0f;"),
    "mean over D + 1": ("simd_sum(ss) / float(D) + eps[0]", "simd_sum(ss) / float(D + 1) + eps[0]"),
    "eps left out": ("simd_sum(ss) / float(D) + eps[0]", "simd_sum(ss) / float(D)"),
    "norm weight of the other half": ("float(w[i + HALF])", "float(w[i])"),
    "k normed with q's weight": ("isq ? q_norm_w : k_norm_w", "q_norm_w"),
    "heads D/2 apart": ("size_t base = size_t(isq ? head : head - HQ) * D;",
                        "size_t base = size_t(isq ? head : head - HQ) * HALF;"),
    "last head never written": ("if (head >= H) return;", "if (head + 1 >= H) return;"),
}


@pytest.mark.parametrize("slip", BROKEN)
def test_a_broken_copy_of_the_template_is_caught(slip, check_fails_on):
    check_fails_on(NAME, HEADS, *BROKEN[slip], {"NSG": 2, "REG": 0}, "float32")


def test_guard_finds_nothing_in_the_ops_files():
    r = CliRunner().invoke(main, ["guard", str(ROOT / "templates" / NAME), str(ROOT / "hlh_mlx" / "ops" / f"{NAME}.py")])
    assert r.exit_code == 0, r.output


def test_a_failed_check_prints_the_seed_that_replays_its_inputs(extra_templates):
    """A failure found on fresh random inputs can be replayed: `check` prints, per failure, the
    command that checks that variant alone on the same inputs, and it fails the same way."""
    # every input draw fails this (an offset of 1 where 1-4095 are drawn), each by its own error
    extra_templates(NAME, "broken.metal.j2", HEADS.replace("float pos = float(offset[0]);", "float pos = 1.0f;"))
    args = ["check", NAME, "broken", "-p", "NSG=2", "-p", "REG=0", "--dtype", "float32", "--dtype", "float16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    errors = re.findall(r"relative error \S+", r.output)
    replays = re.findall(r"replay: hlh_mlx (.*)", r.output)
    assert len(errors) == len(replays) == 2, r.output
    # the second job's inputs (a seed of its own), replayed alone
    again = CliRunner().invoke(main, replays[1].split())
    assert again.exit_code == 1 and "--dtype float16" in replays[1], again.output
    assert re.findall(r"relative error \S+", again.output) == [errors[1]], (r.output, again.output)
    # the sanitizer changes memory layout: a run without it is replayed without it
    assert "--no-sanitize" in CliRunner().invoke(main, [*replays[0].split(), "--no-sanitize"]).output
    # a seed given replays the whole run
    seed = re.search(r"--input-seed (\d+)", replays[0]).group(1)
    runs = [CliRunner().invoke(main, args + ["--input-seed", seed]).output for _ in range(2)]
    assert re.findall(r"relative error \S+", runs[0]) == re.findall(r"relative error \S+", runs[1]) == errors
