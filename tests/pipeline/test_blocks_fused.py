"""A patched Llama-style block decodes through four fused ops (norm + q/k/v + RoPE, o +
residual, norm + gate + up + SwiGLU, down + residual) with the same logits; blocks the
fused kernels do not serve say why and keep the partly fused step."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from hlh_mlx import blocks, models, patching, runtime, tuned

from .test_blocks import _decode


@pytest.fixture(autouse=True)
def fresh(store_dir):
    tuned.refresh()
    yield
    tuned.refresh()


@pytest.mark.parametrize("rope", [
    nn.RoPE(64, base=10000.0),
    nn.RoPE(64, base=500000.0, scale=0.25),
    initialize_rope(64, 500000.0, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
])
def test_rope_freqs_reproduce_the_module(rope):
    """The fused kernel's RoPE takes mx.fast.rope's `freqs`: they must turn the module's own
    rotation (base and scale, or Llama 3's table) into the same numbers, at several positions."""
    freqs = blocks.rope_freqs(rope, 64)
    assert freqs is not None and freqs.shape == (32,) and freqs.dtype == mx.float32
    x = mx.random.normal((1, 4, 1, 64), key=mx.random.key(1))
    for offset in (0, 5, 3000):
        want = rope(x, offset=offset)
        got = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_rope_freqs_refuse_what_the_kernel_does_not_rotate():
    assert blocks.rope_freqs(nn.RoPE(64, traditional=True), 64) is None  # pairs (2i, 2i+1)
    assert blocks.rope_freqs(nn.RoPE(32), 64) is None                    # a partial rotation
    yarn = initialize_rope(64, 10000.0, False, {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 4096})
    assert blocks.rope_freqs(yarn, 64) is None                           # scales its output too


# Qwen2: q/k/v projections with biases; Qwen3: heads with norms of their own (qk_norm_rope)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_llama_blocks_decode_through_the_four_fused_ops(name, dtype, tol):
    model, _ = models.load(name, bits=4, dtype=dtype)
    before = _decode(model)
    report = patching.patch(model)
    layers = model.model.layers
    assert all(isinstance(b, blocks.DecoderBlock) for b in layers), report
    assert [n for _, n in report.notes] == [patching.FUSABLE] * len(layers), report
    assert all(b.why_not_fully_fused() is None for b in layers)
    _always_fused(layers)
    after = _decode(model)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=tol, atol=tol)
    # the decode step called each fused op with arguments its kernels take (bind accepted
    # them: a refused call is never decided), at the model's shapes
    called = {op: shape for op, shape, _ in runtime.decided_calls()}
    assert called["norm_qkv_rope"]["K"] == 128 and called["norm_qkv_rope"]["D"] == 32
    assert called["norm_qkv_rope"]["B"] == (name == "tiny-qwen2")
    if name == "tiny-qwen3":
        assert called["qk_norm_rope"] == {"NQ": 128, "NK": 64, "D": 32}
    else:
        assert "qk_norm_rope" not in called
    assert called["qgemv_add"]["N"] == 128 and {called["qgemv_add"]["K"]} <= {128, 256}
    assert called["norm_qgemv_swiglu"]["N"] == 256


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe"])
def test_a_one_token_prompt_decodes_from_position_zero(name):
    """mlx-lm sends a one-token prompt through the decode step at offset 0, the step's first
    call: the fused step's own zero (Qwen3's projections unrotated) must not be the step's
    offset array (MLX refuses an array that is both an input of a trace and a constant in it)."""
    from mlx_lm.generate import generate_step
    model, _ = models.load(name, bits=4, dtype="float32")
    prompt = mx.array([3])
    want = [t for t, _ in zip(generate_step(prompt, model), range(4))]
    patching.patch(model)
    _always_fused(model.model.layers)
    got = [t for t, _ in zip(generate_step(prompt, model), range(4))]
    assert [int(t) for t, _ in got] == [int(t) for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_the_fused_step_follows_the_offset_through_one_trace():
    """The position is data inside the compiled step: each decode step rotates by its own
    offset (a step that reused the first step's position would drift from the unpatched logits)."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32", seed=3)
    before = _decode(model, steps=9, prompt=(2, 7))
    patching.patch(model)
    _always_fused(model.model.layers)
    np.testing.assert_allclose(np.asarray(_decode(model, steps=9, prompt=(2, 7))), np.asarray(before),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,reason", [
    ("tiny-qwen2-moe", "routing and routed experts fusable (moe_route, moe_qgemv_swiglu and moe_qgemv_combine"),
])
def test_other_blocks_say_why_they_are_partly_fused(name, reason):
    model, _ = models.load(name, bits=4, dtype="float32")
    before = _decode(model)
    report = patching.patch(model)
    notes = [n for _, n in report.notes]
    assert notes and all(reason in n for n in notes), report
    assert reason in str(report)
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)


def test_mixed_quantization_is_partly_fused_with_the_reason():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    block = model.model.layers[0]
    down = block.mlp.down_proj
    w = mx.dequantize(down.weight, down.scales, down.biases, group_size=64, bits=4)
    block.mlp.down_proj = nn.QuantizedLinear.from_linear(_linear(w), group_size=128, bits=4)
    before = _decode(model)
    report = patching.patch(model)
    assert "the attention input fuses; not the MLP half: projections quantized in different formats" \
        in report.notes[0][1], report
    assert report.notes[1][1] == patching.FUSABLE, report
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)


def test_eight_bit_blocks_are_partly_fused_with_the_reason():
    model, _ = models.load("tiny-llama", bits=8, dtype="float32")
    before = _decode(model)
    report = patching.patch(model)
    assert report.notes and all("not 4-bit affine" in n for _, n in report.notes), report
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)


def test_mxfp4_weights_are_kept_with_the_reason_and_the_same_logits():
    """MLX's microscaled 4-bit format (mode="mxfp4", group 32) is not what the 4-bit kernels
    read: every projection is kept as it is, each block says why, the logits do not move."""
    model, _ = models.load("tiny-llama", bits=16, dtype="float32")
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4")
    before = _decode(model)
    report = patching.patch(model)
    kept = {p: why for p, _, why in report.kept}
    projections = [p for p in kept if p.endswith("_proj")]
    assert len(projections) == 14 and all("4-bit affine" in kept[p] for p in projections), report
    assert report.notes and all("(4, 32, 'mxfp4')" in n for _, n in report.notes), report
    np.testing.assert_array_equal(np.asarray(_decode(model)), np.asarray(before))


def _always_fused(layers):
    """Run the fused ops even where no variant serves them (their built-in compositions here)."""
    for b in layers:
        object.__setattr__(b, "_fused", "always")
        b.reset()


def test_untuned_fused_ops_leave_the_step_unfused(monkeypatch):
    """Where no stored variant serves a fused op its built-in composition would run: the block
    runs the unfused half instead (whose layers may each be tuned); where one does, the fused
    half. The choice is made per half, from the store, when the step is traced."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    before = _decode(model)
    patching.patch(model)
    layers = model.model.layers
    _decode(model)  # traces the step: nothing is tuned on this CPU
    assert layers[0]._fused_steps_that_pay(mx.zeros((1, 1, 128))) == (False, False, False)
    served = {"qgemv_add", "norm_qgemv_swiglu"}
    monkeypatch.setattr(runtime, "serves", lambda op, *a, **k: op in served)
    for b in layers:
        b.reset()
    called = []
    real = blocks.DecoderBlock._out_fused
    monkeypatch.setattr(blocks.DecoderBlock, "_out_fused", lambda self, x, o: called.append(1) or real(self, x, o))
    qkv_fused = []
    real_qkv = blocks.DecoderBlock._qkv_fused
    monkeypatch.setattr(blocks.DecoderBlock, "_qkv_fused", lambda self, x, off: qkv_fused.append(1) or real_qkv(self, x, off))
    after = _decode(model)
    assert called and not qkv_fused  # the post half traced fused, the pre half not
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4)


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = w
    return lin


@pytest.mark.parametrize("fused_us,split_parts_us,mlp_fused", [(57.4, (7.6, 36.0), False), (40.0, (7.6, 36.0), True),
                                                               (57.4, (None, 36.0), True)])
def test_the_mlp_takes_the_form_the_store_says_costs_less(monkeypatch, fused_us, split_parts_us, mlp_fused):
    """norm_qgemv_swiglu against rms_norm then qgemv_swiglu, by each call's stored chain latency
    + host time; the fused form when a part was never timed. Either form computes the same."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    before = _decode(model)
    patching.patch(model)
    monkeypatch.setattr(runtime, "serves", lambda op, *a, **k: op in {"qgemv_add", "norm_qgemv_swiglu"})
    costs = {"norm_qgemv_swiglu": fused_us, "rms_norm": split_parts_us[0], "qgemv_swiglu": split_parts_us[1]}
    monkeypatch.setattr(runtime, "expected_us", lambda op, *a, **k: costs.get(op))
    tuned.refresh()  # forget the calls patch's checks decided: what is decided next, the step ran
    after = _decode(model)
    assert all(b._mlp_fused is mlp_fused for b in model.model.layers)
    called = {op for op, _, _ in runtime.decided_calls()}
    assert ("norm_qgemv_swiglu" in called) is mlp_fused
    assert ("qgemv_swiglu" in called) is not mlp_fused
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4)


def test_a_batch_of_sequences_decodes_unfused_after_a_single_one():
    """The fused ops take one token of one sequence: a block that traced its step for one
    sequence must not reuse it for a batch (nor the reverse), whatever it chose."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    from mlx_lm.models.cache import make_prompt_cache

    def decode(batch):
        cache = make_prompt_cache(model)
        out = [model(mx.array([[3, 1, 4]] * batch), cache=cache)[:, -1]]
        for _ in range(3):
            out.append(model(mx.array([[7]] * batch), cache=cache)[:, -1])
        return np.asarray(mx.stack(out))
    before = [decode(1), decode(2)]
    patching.patch(model)
    _always_fused(model.model.layers)
    for got, want in zip([decode(1), decode(2), decode(1)], before + before[:1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _step_primitives(model) -> list:
    """Primitive names of one decode step's graph (mx.export_to_dot of its logits)."""
    import re
    import tempfile
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[3, 1, 4]]), cache=cache))
    mx.eval(model(mx.array([[7]]), cache=cache))
    out = model(mx.array([[7]]), cache=cache)
    with tempfile.TemporaryDirectory() as d:
        mx.export_to_dot(f"{d}/step.dot", out)
        text = open(f"{d}/step.dot").read()
    mx.eval(out)
    return [n.split(" ")[0] for n in re.findall(r"label ?= ?\"([^\"]+)\", shape=rectangle", text)]


def test_a_decode_step_builds_no_nodes_it_does_not_need():
    """Each node costs the host microseconds to build and encode, and a patched step is
    host-bound: one token's q/k/v take the heads-first layout by a reshape (no transposes),
    every layer shares one offset array, and RoPE's freqs are a constant of the fused
    step's trace (unevaluated, their graph would run again every step)."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    unpatched = _step_primitives(model)
    patching.patch(model)
    layers = model.model.layers
    patched = _step_primitives(model)
    assert unpatched.count("Transpose") >= 3 * len(layers)  # mlx-lm's q, k, v
    assert patched.count("Transpose") < unpatched.count("Transpose") - 3 * len(layers) + 1
    from hlh_mlx.ops.rope import _offset_array
    assert _offset_array(12) is _offset_array(12) and _offset_array(13) is not _offset_array(12)
    _always_fused(layers)
    import re
    assert not [p for p in _step_primitives(model) if re.search(r"Exp(?!andDims)", p)]


def test_the_fused_post_half_keeps_the_tokens_shape(store_dir, monkeypatch):
    """With variants serving qgemv_add and norm_qgemv_swiglu (real templates on the
    emulator), the post half's activations keep x's (1, 1, dims) shape end to end: the
    kernels get them as they are (no reshape to (1, dims) and back: each view is a graph
    node the host pays for), attention's (1, heads, 1, head_dim) output included, and it
    computes what the unfused half computes."""
    from hlh_mlx import runtime, templates, variants

    from .test_tuned import write

    def simd(op, **params):
        t = next(t for t in templates.discover(op) if t.family == "simd" and t.backend == "metal")
        return variants.make(t, params)
    write(store_dir, "qgemv_add", {"N": 128, "K": 256, "G": 64}, "float32", simd("qgemv_add", SG=2, RPS=2, PW=2),
          ms=0.5, base_ms=1.0)
    write(store_dir, "norm_qgemv_swiglu", {"N": 256, "K": 128, "G": 64}, "float32",
          simd("norm_qgemv_swiglu", NSG=2, RPS=2, PW=2), ms=0.5, base_ms=1.0)
    tuned.refresh()
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model)
    b = model.model.layers[0]
    x = mx.random.normal((1, 1, 128), key=mx.random.key(1))
    o = mx.random.normal((1, 4, 1, 32), key=mx.random.key(2))
    mx.eval(x, o)
    assert b._fused_steps_that_pay(x)[1:] == (True, True)  # post half fused, norm_qgemv_swiglu
    object.__setattr__(b, "_mlp_fused", True)
    bound = []
    real = runtime._bind
    monkeypatch.setattr(runtime, "_bind", lambda op, a, k: bound.append(real(op, a, k)) or bound[-1])
    tuned.refresh()  # decide the calls again: each is bound once
    out = b._out_fused(x, o)
    assert [c.inputs[0].shape for c in bound] == [(1, 4, 1, 32), (1, 1, 128), (1, 1, 256)]  # o, h, y
    assert bound[0].inputs[0] is o and bound[0].inputs[-1] is x  # o and the residual as given
    assert out.shape == x.shape
    assert tuned.fallbacks() == {}
    np.testing.assert_allclose(np.asarray(out), np.asarray(b._out(x, o)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_the_fused_pre_half_makes_attentions_layout_itself(store_dir, monkeypatch, name):
    """With a variant serving norm_qkv_rope (its Metal template on the emulator), the pre half
    is that one call: the token goes in as (1, 1, dims) and q, k, v come out (1, heads, 1,
    head_dim) from the kernel, no view nodes around it, with the unfused half's values
    (Qwen2's: the kernel adds the q/k/v projections' biases). Qwen3's heads have norms of
    their own: two calls, norm_qkv_rope unrotated and qk_norm_rope on its q and k as they come."""
    from hlh_mlx import runtime, templates, variants

    from .test_tuned import write

    t = next(t for t in templates.discover("norm_qkv_rope") if t.backend == "metal")
    biased = int(name == "tiny-qwen2")
    write(store_dir, "norm_qkv_rope", {"NQ": 128, "NK": 64, "K": 128, "G": 64, "D": 32, "B": biased}, "float32",
          variants.make(t, {"NSG": 2, "PW": 2}), ms=0.5, base_ms=1.0)
    head_norms = name == "tiny-qwen3"
    if head_norms:
        t = next(t for t in templates.discover("qk_norm_rope") if t.backend == "metal")
        write(store_dir, "qk_norm_rope", {"NQ": 128, "NK": 64, "D": 32}, "float32",
              variants.make(t, {"NSG": 2, "REG": 1}), ms=0.5, base_ms=1.0)
    tuned.refresh()
    model, _ = models.load(name, bits=4, dtype="float32")
    attn = model.model.layers[0].self_attn
    if biased:  # large enough that a kernel dropping one is far outside the tolerance below
        for p in ("q_proj", "k_proj", "v_proj"):
            attn[p].bias = mx.random.normal(attn[p].bias.shape, key=mx.random.key(7))
    if head_norms:  # norm weights of their own (random models start them at 1)
        for i, n in enumerate(("q_norm", "k_norm")):
            attn[n].weight = 1 + 0.5 * mx.random.normal((32,), key=mx.random.key(11 + i))
    patching.patch(model)
    b = model.model.layers[0]
    x = mx.random.normal((1, 1, 128), key=mx.random.key(3))
    mx.eval(x)
    b._steps(x)  # the fused step's freqs, as the decode step sets them
    assert b._fused_steps_that_pay(x)[0]
    bound = []
    real = runtime._bind
    monkeypatch.setattr(runtime, "_bind", lambda op, a, k: bound.append(real(op, a, k)) or bound[-1])
    tuned.refresh()
    from hlh_mlx.ops.rope import _offset_array
    got = b._qkv_fused(x, _offset_array(9))
    assert len(bound) == 1 + head_norms and bound[0].inputs[0] is x and bound[0].shape["B"] == biased
    if head_norms:  # q and k straight from the first kernel, in attention's layout
        assert [a.shape for a in bound[1].inputs[:2]] == [(1, 4, 1, 32), (1, 2, 1, 32)]
        assert bound[1].shape == {"NQ": 128, "NK": 64, "D": 32}
    assert [o.shape for o in got] == [(1, 4, 1, 32), (1, 2, 1, 32), (1, 2, 1, 32)] and tuned.fallbacks() == {}
    for g, w in zip(got, b._qkv(x, 9)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,reason", [
    (lambda a: setattr(a, "k_norm", nn.LayerNorm(32)), "not both RMSNorms (q_norm, k_norm)"),
    (lambda a: setattr(a.k_norm, "eps", 1e-3), "different eps (1e-06, 0.001)"),
])
def test_head_norms_the_fused_op_does_not_compute_keep_the_attention_input_unfused(change, reason):
    """qk_norm_rope is an RMSNorm over each head with one eps for q and k: other head norms
    keep the attention input as the children compute it, said so, with the same logits."""
    model, _ = models.load("tiny-qwen3", bits=4, dtype="float32")
    for layer in model.model.layers:
        change(layer.self_attn)
    before = _decode(model)
    report = patching.patch(model)
    notes = [n for _, n in report.notes]
    assert notes and all(f"the MLP half fuses; not the attention input: the queries' and keys' norms" in n
                         and reason in n for n in notes), report
    _always_fused(model.model.layers)
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert "qk_norm_rope" not in {op for op, _, _ in runtime.decided_calls()}
