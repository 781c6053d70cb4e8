"""An MoE block's routing and routed experts at decode as three fused ops (moe_route,
moe_qgemv_swiglu, moe_qgemv_combine): the tuned calls equal what mlx-lm's routing, SwitchGLU
and weighted sum compute (the routing's ties broken as MLX's CUDA sort breaks them), refuse
what they cannot serve with a reason, their templates are proven and broken copies caught,
and a patched Qwen2-MoE / Qwen3-MoE model decodes through them with the same logits.

As in test_tuned, the emulator measures no speed: a store record with made-up timings makes
a variant the winner, and the kernel that then runs is the real template on the emulator."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from hlh_mlx import blocks, cuda_source, models, moe, ops, patching, runtime, templates, tuned, variants

from .conftest import ROOT
from .test_blocks import _decode
from .test_blocks_fused import _always_fused, _step_primitives
from .test_tuned import write

pytestmark = pytest.mark.usefixtures("tuned_fresh")

UP = "moe_qgemv_swiglu"
DOWN = "moe_qgemv_combine"
ROUTE = "moe_route"


def simd(op, family="simd", **params):
    t = next(t for t in templates.discover(op) if t.family == family and t.backend == "metal")
    return variants.make(t, params)


def experts(rng, dims=128, hidden=64, n_experts=5, dtype=mx.float32, group_size=64):
    """mlx-lm's own SwitchGLU, quantized as mlx-lm converts a checkpoint."""
    sw = SwitchGLU(dims, hidden, n_experts)
    import mlx.nn as nn
    nn.quantize(sw, group_size=group_size, bits=4)
    sw.set_dtype(dtype)
    return sw


def packed(p):
    return p["weight"], p["scales"], p["biases"]


def truth(sw, x, inds, scores):
    """SwitchGLU and the weighted sum in float32 throughout, from the same quantized weights."""
    def gemv(p, v, e):
        w = mx.dequantize(p["weight"][e], p["scales"][e].astype(mx.float32), p["biases"][e].astype(mx.float32),
                          group_size=64, bits=4)
        return w @ v
    x32 = x.astype(mx.float32).reshape(-1)
    out = 0
    for e, s in zip(inds.reshape(-1).tolist(), scores.astype(mx.float32).reshape(-1).tolist()):
        g, u = gemv(sw.gate_proj, x32, e), gemv(sw.up_proj, x32, e)
        out = out + s * gemv(sw.down_proj, g * mx.sigmoid(g) * u, e)
    return out.reshape(x.shape)


def serve_both(store_dir, shape_up, shape_down, dtype="float32"):
    write(store_dir, UP, shape_up, dtype, simd(UP, NSG=2, RPS=2, PW=2), ms=0.5, base_ms=1.0)
    write(store_dir, DOWN, shape_down, dtype, simd(DOWN, NSG=2, RPS=1, PW=2), ms=0.5, base_ms=1.0)
    tuned.refresh()


@pytest.mark.parametrize("dtype,tol", [("float32", 3e-5), ("float16", 3e-3), ("bfloat16", 2e-2)])
def test_tuned_expert_calls_run_the_winners_and_equal_mlx_lms_experts(store_dir, rng, dtype, tol):
    dt = getattr(mx, dtype)
    serve_both(store_dir, {"S": 2, "E": 5, "N": 64, "K": 128, "G": 64}, {"S": 2, "E": 5, "N": 128, "K": 64, "G": 64},
               dtype)
    sw = experts(rng, dtype=dt)
    x = mx.array(rng.standard_normal((1, 1, 128)).astype(np.float32)).astype(dt)
    inds = mx.array([[[4, 1]]], dtype=mx.uint32)  # as a router's top-k gives them: (1, 1, k)
    scores = mx.array([[[0.7, 0.2]]]).astype(dt)
    y = tuned.moe_qgemv_swiglu(x, inds, *packed(sw.gate_proj), *packed(sw.up_proj), group_size=64)
    out = tuned.moe_qgemv_combine(y, inds, scores, *packed(sw.down_proj), group_size=64)
    assert tuned.fallbacks() == {}, tuned.fallbacks()
    assert y.shape == (1, 1, 2, 64) and out.shape == (1, 1, 128) and out.dtype == dt
    want = (sw(x, inds) * scores[..., None]).sum(axis=-2)  # mlx-lm's SwitchGLU and weighted sum
    if dtype == "float32":
        err = float(mx.linalg.norm(out - want) / mx.linalg.norm(want))
        assert err < tol, err
    else:  # as close to the float32 truth as mlx-lm's own half computation is
        exact = truth(sw, x, inds, scores)
        err, mlx_err = (float(mx.linalg.norm(a.astype(mx.float32) - exact) / mx.linalg.norm(exact))
                        for a in (out, want))
        assert err < 1.5 * mlx_err + 1e-3, (err, mlx_err)
    # the same experts in the other order: the same sum (the kernel follows the indices)
    out2 = tuned.moe_qgemv_combine(y[..., ::-1, :], inds[..., ::-1], scores[..., ::-1], *packed(sw.down_proj),
                                   group_size=64)
    np.testing.assert_allclose(np.asarray(out2.astype(mx.float32)), np.asarray(out.astype(mx.float32)),
                               rtol=tol, atol=tol)


def test_int32_indices_and_an_index_past_the_experts(store_dir, rng):
    """int32 expert numbers serve as uint32 ones; an index past the last expert, or a negative
    one, reads the last (never memory outside the weights: the emulator's sanitizer would
    stop the kernel)."""
    serve_both(store_dir, {"S": 2, "E": 5, "N": 64, "K": 128, "G": 64}, {"S": 2, "E": 5, "N": 128, "K": 64, "G": 64})
    sw = experts(rng)
    x = mx.array(rng.standard_normal((1, 128)).astype(np.float32))
    args = (*packed(sw.gate_proj), *packed(sw.up_proj))
    a = tuned.moe_qgemv_swiglu(x, mx.array([3, 4], dtype=mx.int32), *args)
    b = tuned.moe_qgemv_swiglu(x, mx.array([3, 4], dtype=mx.uint32), *args)
    c = tuned.moe_qgemv_swiglu(x, mx.array([3, 9], dtype=mx.uint32), *args)
    d = tuned.moe_qgemv_swiglu(x, mx.array([3, -1], dtype=mx.int32), *args)  # the built-in: NaN here
    assert tuned.fallbacks() == {}
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(d), np.asarray(b))


def test_what_the_kernels_cannot_serve_runs_mlx_lms_computation_with_a_reason(store_dir, rng):
    serve_both(store_dir, {"S": 2, "E": 5, "N": 64, "K": 128, "G": 64}, {"S": 2, "E": 5, "N": 128, "K": 64, "G": 64})
    sw = experts(rng)
    x3 = mx.array(rng.standard_normal((2, 3, 128)).astype(np.float32))  # six tokens
    inds = mx.array(rng.integers(0, 5, (2, 3, 2)).astype(np.uint32))
    scores = mx.array(rng.random((2, 3, 2)).astype(np.float32))
    up = (*packed(sw.gate_proj), *packed(sw.up_proj))
    assert "one token only" in tuned.explain(UP, x3, inds, *up)
    y = tuned.moe_qgemv_swiglu(x3, inds, *up)
    assert "one token's experts only" in tuned.explain(DOWN, y, inds, scores, *packed(sw.down_proj))
    out = tuned.moe_qgemv_combine(y, inds, scores, *packed(sw.down_proj))
    want = (sw(x3, inds) * scores[..., None]).sum(axis=-2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    x = x3[:1, :1]
    assert "bits=4" in tuned.explain(UP, x, inds[:1, :1], *up, bits=8)
    assert "uint32 or int32" in tuned.explain(UP, x, inds[:1, :1].astype(mx.float32), *up)
    assert "scores must be float32 (moe_route's) or y's dtype" in tuned.explain(
        DOWN, y[:1, :1].astype(mx.float16), inds[:1, :1], scores[:1, :1].astype(mx.bfloat16),
        *[a.astype(mx.float16) if a.dtype != mx.uint32 else a for a in packed(sw.down_proj)])


def test_emulator_check_of_a_sample_passes(store_dir):
    from click.testing import CliRunner

    from hlh_mlx.cli import main
    for op in (UP, DOWN):
        r = CliRunner().invoke(main, ["check", op, "simd", "--sample", "2", "--seed", "5"])
        assert r.exit_code == 0, r.output
        assert "6 passed, 0 failed" in r.output


# each a plausible slip in an expert kernel; the check must fail every one
BROKEN = {
    UP: {
        "every slot reads expert 0": ("size_t e = min(indices[s], E - 1);", "size_t e = 0;"),
        "slots write over each other": ("y[size_t(s) * N + row0 + r]", "y[row0 + r]"),
        "scales of expert 0": ("size_t so = (e * N + row) * NG + grp;", "size_t so = row * NG + grp;"),
    },
    DOWN: {
        "scores left out": ("* sc)", ")"),
        "only the first expert": ("for (uint s = 0; s < SN; s++)", "for (uint s = 0; s < 1; s++)"),
        "each expert against the first's activations": ("y + size_t(s) * K", "y"),
    },
}


@pytest.mark.parametrize("op,why", [(op, why) for op in BROKEN for why in BROKEN[op]])
def test_a_broken_copy_of_the_template_is_caught(op, why, check_fails_on):
    src = (ROOT / "templates" / op / "simd.metal.j2").read_text()
    check_fails_on(op, src, *BROKEN[op][why], {"NSG": 2, "RPS": 2, "PW": 2}, "float32")


needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
@pytest.mark.parametrize("op,params", [
    (UP, dict(KS=2, RPT=2, TEAMS=2, PW=4, U=2, CS=0)),    # split K: the shared-memory epilogue
    (DOWN, dict(KS=2, RPT=2, TEAMS=4, PW=4, U=1, CS=1)),
], ids=["up-ks2", "down-ks2"])
def test_the_cuda_split_k_sum_compiles_at_a_ragged_k(op, params):
    t = next(t for t in templates.discover(op) if t.backend == "cuda")
    spec = ops.get(op)
    shape = spec.edge_shapes[-1]
    assert shape["K"] == 2112 and shape["K"] // 8 % 256  # two warps a row, the last step ragged
    v = variants.make(t, params)
    assert v.supports(shape, "bfloat16")  # the GPU check runs this variant at this shape
    cuda_source.check_variant(v, spec, "bfloat16", shape)


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-mixtral"])
def test_moe_blocks_route_and_call_the_expert_ops_as_mlx_lm_does(name):
    """Qwen2-MoE (with its shared expert), Qwen3-MoE (top-k weights renormalised) and
    Mixtral (top-k of the logits, softmax over those; its MLP is `block_sparse_moe`), the
    expert ops forced on with nothing tuned (their built-in compositions run): the router
    copied from mlx-lm's blocks and the calls made at decode give mlx-lm's logits, through
    the compiled halves. The kernels themselves: the test after this one."""
    model, _ = models.load(name, bits=4, dtype="float32")
    before = _decode(model)
    report = patching.patch(model)
    layers = model.model.layers
    assert all(isinstance(b, blocks.DecoderBlock) for b in layers), report
    # Qwen2-MoE's attention input (q/k/v with biases) is norm_qkv_rope's too; Qwen3-MoE's
    # queries and keys have norms of their own: qk_norm_rope's after it
    attention = ("; the attention input (norm_qkv_rope, qk_norm_rope) too" if name == "tiny-qwen3-moe" else
                 "; the attention input (norm_qkv_rope) too")
    note = (patching.MOE_EXPERTS_FUSABLE.format(order="mixtral") if name == "tiny-mixtral" else
            patching.MOE_FUSABLE)  # no moe_route kernel takes Mixtral's order: mlx-lm's ops route
    assert [n for _, n in report.notes] == [note + attention] * len(layers), report
    _always_fused(layers)
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert all(b._moe_fused for b in layers)
    mlp = model.model.layers[0].mlp_module
    called = {op: shape for op, shape, _ in runtime.decided_calls()}
    if name == "tiny-mixtral":  # no biases, no head norms: the pre half is the one call
        assert called["norm_qkv_rope"] == {"NQ": 128, "NK": 64, "K": 128, "G": 64, "D": 32, "B": 0}
        assert "qk_norm_rope" not in called and ROUTE not in called  # asked, refused: mlx-lm's routing ran
    elif name == "tiny-qwen2-moe":  # the pre half ran as the one call, with the projections' biases
        assert called["norm_qkv_rope"] == {"NQ": 128, "NK": 128, "K": 128, "G": 64, "D": 32, "B": 1}
        assert "qk_norm_rope" not in called
    else:  # two calls: the projections, then the heads' norms and RoPE
        assert called["norm_qkv_rope"] == {"NQ": 128, "NK": 64, "K": 128, "G": 64, "D": 32, "B": 0}
        assert called["qk_norm_rope"] == {"NQ": 128, "NK": 64, "D": 32}
    assert called[UP] == {"S": moe.top_k(mlp), "E": mlp.num_experts, "N": 128, "K": 128, "G": 64}
    assert called[DOWN] == {"S": moe.top_k(mlp), "E": mlp.num_experts, "N": 128, "K": 128, "G": 64}
    assert {op for op, _ in tuned.fallbacks()} >= {UP, DOWN}  # the compositions, as said


def test_mixtrals_routing_runs_mlx_lms_ops_and_is_no_fallback_in_strict_mode(store_dir, monkeypatch):
    """No kernel takes Mixtral's routing: it runs mlx-lm's lines directly (not a fallback each
    step, which strict mode would refuse), with the expert ops served by their kernels."""
    from hlh_mlx import config
    model, _ = models.load("tiny-mixtral", bits=4, dtype="float32")
    mlp = model.model.layers[0].block_sparse_moe  # unpatched: its gate is mlx-lm's own layer
    shape = {"S": moe.top_k(mlp), "E": mlp.num_experts, "N": 128, "K": 128, "G": 64}
    serve_both(store_dir, shape, shape)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()
    x = mx.array(np.random.default_rng(0).standard_normal((1, 1, 128)).astype(np.float32))
    got = moe.decode(mlp, x)  # strict: the routing and both expert kernels, no fallback anywhere
    np.testing.assert_allclose(np.asarray(got), np.asarray(mlp(x)), rtol=1e-4, atol=1e-4)
    assert tuned.fallbacks() == {}


def test_blocks_named_like_mixtrals_but_unknown_are_kept_with_the_reason():
    import mlx.nn as nn

    class OtherMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4)

    model, _ = models.load("tiny-mixtral", bits=4, dtype="float32")
    block = model.model.layers[0]
    block.block_sparse_moe = OtherMoE()
    assert "OtherMoE, not an MoE block hlh_mlx.moe reproduces" in blocks.why_not(block)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", None)])
def test_served_expert_kernels_replace_the_gathers_in_the_decode_step(store_dir, dtype, tol):
    """With stored variants serving the three ops at the model's shapes (real templates on
    the emulator, the block's halves run uncompiled), the store's choice is taken: no
    softmax, argpartition or gather_qmm is left in a decode step, no call falls back, and
    the logits are mlx-lm's."""
    model, _ = models.load("tiny-qwen3-moe", bits=4, dtype=dtype)
    before = _decode(model)
    unpatched = _step_primitives(model)
    mlp = model.model.layers[0].mlp
    serve_both(store_dir, {"S": mlp.top_k, "E": mlp.num_experts, "N": 128, "K": 128, "G": 64},
               {"S": mlp.top_k, "E": mlp.num_experts, "N": 128, "K": 128, "G": 64}, dtype)
    write(store_dir, ROUTE, {"E": mlp.num_experts, "S": mlp.top_k, "ORDER": 1, "NORM": 1}, dtype,
          simd(ROUTE, "select", TG=64), ms=0.5, base_ms=1.0)
    tuned.refresh()
    patching.patch(model)
    tuned.refresh()  # forget the fallbacks of patch's own check (it traced the compiled halves)
    for b in model.model.layers:  # the emulator's kernels run outside mx.compile only: the plain halves
        steps = b._steps
        object.__setattr__(b, "_steps", lambda x, _steps=steps: tuple(h.plain for h in _steps(x)))
    after = _decode(model)
    if tol:
        np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=tol, atol=tol)
    else:  # half: as close to the float32 model's logits as mlx-lm's own half run is
        exact = _decode(models.load("tiny-qwen3-moe", bits=4, dtype="float32")[0])
        err, mlx_err = (float(mx.max(mx.abs(a - exact))) for a in (after, before))
        assert err < 1.5 * mlx_err + 1e-3, (err, mlx_err)
    assert all(b._moe_fused for b in model.model.layers)
    assert not [op for op, _ in tuned.fallbacks() if op.startswith("moe_")], tuned.fallbacks()
    patched = _step_primitives(model)
    layers = len(model.model.layers)
    assert unpatched.count("GatherQMM") == 3 * layers and "GatherQMM" not in patched
    assert unpatched.count("ArgPartition") == layers and "ArgPartition" not in patched
    assert unpatched.count("Softmax") >= layers and "Softmax" not in patched


def test_unserved_expert_ops_leave_mlx_lms_experts_in_place(store_dir):
    model, _ = models.load("tiny-qwen2-moe", bits=4, dtype="float32")
    patching.patch(model)
    x = mx.zeros((1, 1, 128))
    b = model.model.layers[0]
    assert not b._moe_that_pays(x)  # nothing tuned on this CPU
    assert "GatherQMM" in _step_primitives(model)


def test_mlps_the_fused_path_does_not_reproduce_say_why(rng):
    model, _ = models.load("tiny-qwen2-moe", bits=8, dtype="float32")
    assert "not 4-bit affine" in moe.why_not(model.model.layers[0].mlp)
    model, _ = models.load("tiny-qwen2-moe", bits=16, dtype="float32")
    assert "not quantized" in moe.why_not(model.model.layers[0].mlp)
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    assert "routing is known" in moe.why_not(model.model.layers[0].mlp)


def test_the_determinism_probe_finds_where_two_runs_part():
    """benchmarks/moe_determinism.py (for the GPU, where the unpatched MoE model's tokens
    were seen to differ run to run): two runs of a tiny model on the CPU agree, and a
    difference in experts, in a block's output bits or in the logits is named where it is."""
    import copy
    import importlib.util
    spec = importlib.util.spec_from_file_location("_moe_determinism", ROOT / "benchmarks" / "moe_determinism.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    model, about = models.load("tiny-qwen2-moe", bits=4)
    prompt = [3, 1, 4, 1, 5]
    a, b = probe.run_once(model, prompt, 3), probe.run_once(model, prompt, 3)
    assert len(a["layers"]) == 2 and len(a["layers"][0]) == 3  # the prefill and two decode steps
    assert probe.first_difference(a, b) is None
    assert not isinstance(model.model.layers[0].mlp, probe._Recorder)  # the model is left as it was
    c = copy.deepcopy(b)
    c["layers"][1][2] = (c["layers"][1][2][0][::-1] + 1, c["layers"][1][2][1])
    assert probe.first_difference(a, c) | {"experts_a": None, "experts_b": None} == \
        {"position": 2, "layer": 1, "kind": "experts chosen", "experts_a": None, "experts_b": None}
    d = copy.deepcopy(b)
    d["layers"][0][2] = (d["layers"][0][2][0], d["layers"][0][2][1] + 1e-3)
    assert probe.first_difference(a, d)["kind"] == "block output bits (same experts)"
    e = copy.deepcopy(b)
    e["logits"][1] = e["logits"][1] * 2
    assert probe.first_difference(a, e)["kind"] == "logits only"
    f = copy.deepcopy(b)
    f["blocks"][1][1] = f["blocks"][1][1] + 1e-3  # the MoE output the same: attention or the cache
    assert probe.first_difference(a, f) | {"max_abs_difference": None} == \
        {"position": 1, "layer": 1, "kind": "block output bits (its MLP's the same)", "max_abs_difference": None}
    assert type(model.model.layers[0]).__name__ == "Qwen2MoeDecoderLayer" and not probe._BLOCK_LOGS  # as it was


def test_the_determinism_probe_takes_dense_and_patched_models():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_moe_determinism", ROOT / "benchmarks" / "moe_determinism.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    model, _ = models.load("tiny-qwen2", bits=4)
    a, b = probe.run_once(model, [3, 1, 4], 3), probe.run_once(model, [3, 1, 4], 3)
    assert probe.first_difference(a, b) is None and a["layers"][0][0][0] is None  # no experts in a dense MLP
    b["layers"][0][2] = (None, b["layers"][0][2][1] + 1e-3)
    assert probe.first_difference(a, b)["kind"] == "MLP output bits"
    patching.patch(model)
    a = probe.run_once(model, [3, 1, 4], 3)
    assert len(a["blocks"][0]) == 3 and a["tokens"] == probe.run_once(model, [3, 1, 4], 3)["tokens"]


def test_training_runs_the_experts_as_they_are(monkeypatch):
    """The expert ops have no gradient: a block in training mode, even on one token after a
    decode chose the fused experts, runs mlx-lm's MLP (and mx.grad works through it)."""
    model, _ = models.load("tiny-qwen2-moe", bits=4, dtype="float32")
    patching.patch(model)
    _always_fused(model.model.layers)
    _decode(model)
    assert all(b._moe_fused for b in model.model.layers)
    calls = []
    monkeypatch.setattr(moe, "decode", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    model.train()
    b = model.model.layers[0]
    x = mx.random.normal((1, 1, 128), key=mx.random.key(0))
    g = mx.grad(lambda x: b(x).sum())(x)
    assert calls == [] and g.shape == x.shape and bool(mx.all(mx.isfinite(g)))


def test_replacing_an_expert_projection_retraces_the_step():
    """The compiled step captures the experts' modules: replacing one a level below the MLP
    (as LoRA tools replace projections) must give a new trace with the new weights."""
    import copy
    model, _ = models.load("tiny-qwen2-moe", bits=4, dtype="float32")
    patching.patch(model)
    b = model.model.layers[0]
    key = b._children_key()
    sw = b["mlp"]["switch_mlp"]
    new = copy.deepcopy(sw.down_proj)
    new.scales = new.scales * 2
    sw.down_proj = new
    assert b._children_key() != key
    shared = b["mlp"]["shared_expert"]
    key = b._children_key()
    shared.down_proj = copy.deepcopy(shared.down_proj)
    assert b._children_key() != key


def _serve_route(store_dir, e, k, order, norm, dtype="float32"):
    write(store_dir, ROUTE, {"E": e, "S": k, "ORDER": order, "NORM": norm}, dtype, simd(ROUTE, "select", TG=32),
          ms=0.5, base_ms=1.0)
    tuned.refresh()


@pytest.mark.parametrize("order,norm", [("qwen2", False), ("qwen3", True), ("qwen3", False)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tuned_routing_chooses_mlx_lms_experts_with_its_weights(store_dir, rng, order, norm, dtype):
    dt = getattr(mx, dtype)
    _serve_route(store_dir, 60, 4, {"qwen2": 0, "qwen3": 1}[order], int(norm), dtype)
    logits = mx.array(rng.standard_normal((1, 1, 60)).astype(np.float32) * 2).astype(dt)
    inds, scores = tuned.moe_route(logits, 4, order=order, norm=norm)
    assert tuned.fallbacks() == {}, tuned.fallbacks()
    assert inds.shape == (1, 1, 4) and inds.dtype == mx.uint32 and scores.dtype == mx.float32
    assert mx.array_equal(scores.astype(dt).astype(mx.float32), scores).item()  # the dtype's values, widened
    want_inds, want_scores = ops.get(ROUTE).function(logits, 4, order, norm)  # mlx-lm's routing ops
    got = dict(zip(np.asarray(inds).ravel().tolist(), np.asarray(scores.astype(mx.float32)).ravel().tolist()))
    want = dict(zip(np.asarray(want_inds).ravel().tolist(), np.asarray(want_scores.astype(mx.float32)).ravel().tolist()))
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=ops.get(ROUTE).tolerance[dtype])
    # the order of a stable sort (MLX's CUDA argpartition): descending for Qwen2, ascending for Qwen3
    w = [got[e] for e in np.asarray(inds).ravel().tolist()]
    assert w == sorted(w, reverse=order == "qwen2")


@pytest.mark.parametrize("order,chosen", [("qwen2", 2), ("qwen3", 5)])
def test_a_tie_at_the_boundary_is_broken_as_a_stable_sort_breaks_it(store_dir, order, chosen):
    """Experts 2 and 5 share the second-largest weight and one of them is chosen: Qwen2's
    descending sort keeps the lower expert first, Qwen3's ascending sort puts the higher one
    among its last k."""
    _serve_route(store_dir, 8, 2, {"qwen2": 0, "qwen3": 1}[order], 0)
    logits = mx.array([[0.0, 0.1, 1.5, 0.2, 3.0, 1.5, -1.0, 0.3]])
    inds, _ = tuned.moe_route(logits, 2, order=order)
    assert tuned.fallbacks() == {}
    # in the stable sort's order: descending for Qwen2, the ascending sort's last two for Qwen3
    assert np.asarray(inds).tolist()[0] == ([4, chosen] if order == "qwen2" else [chosen, 4])


def test_routing_the_kernels_cannot_serve_runs_mlx_lms_ops_with_a_reason(store_dir, rng):
    _serve_route(store_dir, 60, 4, 0, 0)
    logits = mx.array(rng.standard_normal((1, 60)).astype(np.float32))
    assert "order 'mixtral'" in tuned.explain(ROUTE, logits, 4, order="mixtral")
    assert "Qwen3's order" in tuned.explain(ROUTE, logits, 4, order="qwen2", norm=True)
    assert "k must be an int" in tuned.explain(ROUTE, logits, 61)
    assert "k must be an int" in tuned.explain(ROUTE, logits, 2.0)
    assert "one token only" in tuned.explain(ROUTE, mx.concatenate([logits, logits]), 4)
    big = mx.array(rng.standard_normal((1, 1030)).astype(np.float32))
    assert "up to 1024" in tuned.explain(ROUTE, big, 4)
    two = mx.concatenate([logits, logits[:, ::-1]])
    inds, scores = tuned.moe_route(two, 4)  # the built-in, for any number of tokens
    gates = mx.softmax(two, axis=-1, precise=True)  # Qwen2-MoE's routing, as mlx-lm writes it
    want = mx.argpartition(-gates, kth=3, axis=-1)[..., :4]
    assert inds.shape == (2, 4) and (np.sort(np.asarray(inds)) == np.sort(np.asarray(want))).all()
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(mx.take_along_axis(gates, inds, axis=-1)))
    with pytest.raises(ValueError, match="order must be one of"):
        tuned.moe_route(two, 4, order="deepseek")  # the built-in refuses what it does not compute
    # Mixtral's routing is the built-in's alone, mlx-lm's MixtralSparseMoeBlock line for line
    inds, scores = tuned.moe_route(two, 4, order="mixtral")
    want = mx.argpartition(-two, kth=3, axis=-1)[..., :4]
    np.testing.assert_array_equal(np.asarray(inds), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(
        mx.softmax(mx.take_along_axis(two, want, axis=-1), axis=-1, precise=True)))
    assert sorted(np.asarray(inds)[0].tolist()) == sorted(np.argsort(-np.asarray(two)[0])[:4].tolist())
    with pytest.raises(ValueError, match="softmax over the chosen"):
        tuned.moe_route(two, 4, order="mixtral", norm=True)
    assert "up to 1024 and 64" in tuned.explain(ROUTE, mx.array(rng.standard_normal((1, 100)).astype(np.float32)), 65)


BROKEN_ROUTE = {
    "ties broken the other way": ("(w == v && j < e)", "(w == v && j > e)"),
    "renormalisation left out": ("if (NRM) {", "if (false) {"),
    "Qwen2's order ascending": ("(ORD == 0 ? w > v : w < v)", "(w < v)"),
    "Qwen3's chosen counted from the front": ("int(pos) - int(NE - SN)", "int(pos)"),
    "ranked on the weights before rounding": ("(ORD == 0 ? -1.0f : INFINITY) : g[e];", "(ORD == 0 ? -1.0f : INFINITY) : p;"),
}


@pytest.mark.parametrize("why", BROKEN_ROUTE)
def test_a_broken_copy_of_the_routing_template_is_caught(why, check_fails_on):
    src = (ROOT / "templates" / ROUTE / "select.metal.j2").read_text()
    check_fails_on(ROUTE, src, *BROKEN_ROUTE[why], {"TG": 64}, "float16")


@pytest.mark.parametrize("order", ["qwen2", "qwen3"])
def test_nan_logits_rank_where_mlxs_sort_puts_them(store_dir, order):
    """A NaN logit makes every weight NaN; MLX's CUDA sort puts NaN last and keeps the
    experts' order, so Qwen2 takes the first k experts and Qwen3 the last k: every output
    written, nothing read that was not (the sanitizer runs with the tuned call too)."""
    _serve_route(store_dir, 16, 4, {"qwen2": 0, "qwen3": 1}[order], 0)
    logits = mx.array(np.where(np.arange(16) == 5, np.nan, np.linspace(-1, 1, 16)).astype(np.float32)[None])
    inds, scores = tuned.moe_route(logits, 4, order=order)
    assert tuned.fallbacks() == {}
    assert np.asarray(inds).tolist()[0] == ([0, 1, 2, 3] if order == "qwen2" else [12, 13, 14, 15])
    assert np.isnan(np.asarray(scores)).all()


def test_a_route_only_store_runs_the_route_kernel_and_mlx_lms_experts(store_dir):
    """Stored variants for moe_route alone: the block takes the fused path (the routing as one
    kernel), the expert ops run their built-in compositions, and the logits are mlx-lm's."""
    model, _ = models.load("tiny-qwen3-moe", bits=4, dtype="float32")
    before = _decode(model)
    mlp = model.model.layers[0].mlp
    _serve_route(store_dir, mlp.num_experts, mlp.top_k, 1, 1)
    patching.patch(model)
    tuned.refresh()
    for b in model.model.layers:
        steps = b._steps
        object.__setattr__(b, "_steps", lambda x, _steps=steps: tuple(h.plain for h in _steps(x)))
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert all(b._moe_fused for b in model.model.layers)
    fell_back = {op for op, _ in tuned.fallbacks()}
    assert ROUTE not in fell_back and {UP, DOWN} <= fell_back
