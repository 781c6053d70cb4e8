"""hlh_mlx.blocks.DecoderBlock: an mlx-lm block's decode step as two compiled calls, same
results, traced once, weights read as inputs (never stale), eval mode kept."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache

from hlh_mlx import blocks, models, patching, tuned


@pytest.fixture(autouse=True)
def fresh(store_dir):
    tuned.refresh()
    yield
    tuned.refresh()


def _decode(model, steps=4, prompt=(3, 1, 4, 1, 5)):
    cache = make_prompt_cache(model)
    logits = [model(mx.array([list(prompt)]), cache=cache)[:, -1]]
    tok = mx.array([[7]])
    for _ in range(steps):
        logits.append(model(tok, cache=cache)[:, -1])
    return mx.concatenate(logits).astype(mx.float32)


class _Counting(nn.Module):
    """Wraps a layer and counts how often Python runs it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "calls", 0)

    def __call__(self, x):
        object.__setattr__(self, "calls", self.calls + 1)
        return self.inner(x)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen2-moe", "tiny-mixtral"])
def test_blocks_give_the_same_logits_and_trace_the_decode_step_once(name):
    model, _ = models.load(name, bits=4, dtype="float32")
    before = _decode(model)
    report = patching.patch(model)
    layers = model.model.layers
    assert all(isinstance(b, blocks.DecoderBlock) for b in layers), report
    assert not any(b.training for b in layers), "patch put an eval-mode model into training mode"
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)
    counter = _Counting(layers[0].self_attn.q_proj)
    layers[0].self_attn.q_proj = counter
    _decode(model, steps=6)
    # the 5-token prefill runs Python; the six decode steps run it once, to trace
    assert counter.calls == 2


def test_weights_loaded_after_patching_are_used():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    twin, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model)
    assert isinstance(model.model.layers[0], blocks.DecoderBlock)
    _decode(model)  # traced with the old weights
    new = tree_map(lambda w: w * 1.5 if w.dtype == mx.float32 and w.ndim == 2 else w,
                   dict(tree_flatten(model.parameters())))
    model.load_weights(list(new.items()))
    twin.load_weights(list(new.items()))
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(_decode(twin)), rtol=1e-4, atol=1e-4)


def test_a_weight_assigned_after_the_step_was_traced_is_used():
    """The compiled halves take the modules' arrays as inputs on every call: a weight
    assigned after the step was traced is used, and so is an edit in place (the same array
    object, new values), which a trace holding the weights as constants would miss."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    twin, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model)
    _decode(model)  # traced
    for m in (model, twin):
        norm = m.model.layers[1].post_attention_layernorm
        norm.weight = norm.weight * 3 - 1  # lazy: evaluated before it is traced
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(_decode(twin)), rtol=1e-4, atol=1e-4)
    for m in (model, twin):
        m.model.layers[0].input_layernorm.weight[:7] = 0.25
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(_decode(twin)), rtol=1e-4, atol=1e-4)


def test_unquantized_blocks_keep_their_own_step_and_get_patched_layers():
    model, _ = models.load("tiny-llama", bits=16, dtype="float32")
    report = patching.patch(model)
    kept = {p: why for p, _, why in report.kept}
    assert "not quantized" in kept["model.layers.0"] and not isinstance(model.model.layers[0], blocks.DecoderBlock)
    assert "model.layers.0.mlp" in {p for p, _, _ in report.replaced}


def test_a_block_that_computes_something_else_is_kept_with_the_reason():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    block = model.model.layers[0]

    class Odd(type(block)):  # the same children, another computation (no residual on the MLP)
        def __call__(self, x, mask=None, cache=None):
            h = x + self.self_attn(self.input_layernorm(x), mask, cache)
            return self.mlp(self.post_attention_layernorm(h))
    odd = Odd.__new__(Odd)
    odd.__dict__.update(block.__dict__)
    dict.update(odd, block)
    model.model.layers[0] = odd
    report = patching.patch(model)
    kept = {p: why for p, _, why in report.kept}
    assert "decoder block kept: differs at prefill" in kept["model.layers.0"]
    assert model.model.layers[0] is odd and isinstance(model.model.layers[1], blocks.DecoderBlock)


def test_several_sequences_at_decode_give_mlx_rope_one_offset_for_all(monkeypatch):
    """MLX's CUDA rope reads a (1,)-shaped offset per sequence (offset[b]): a block decoding
    two sequences hands it the step's offset as a 0-d array, which every back end
    broadcasts; the logits match the unpatched model's."""
    from mlx_lm.models.cache import KVCache
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    block = model.model.layers[0]
    patched = blocks.DecoderBlock(block)
    seen = []
    real = mx.fast.rope

    def spy(x, *a, offset=0, **k):
        seen.append((x.shape[0], getattr(offset, "ndim", None)))
        return real(x, *a, offset=offset, **k)
    monkeypatch.setattr(mx.fast, "rope", spy)
    dims = block.self_attn.q_proj.weight.shape[1] * 32 // block.self_attn.q_proj.bits
    rng = np.random.default_rng(1)
    caches = (KVCache(), KVCache())
    for t in (3, 1, 1):
        x = mx.array(rng.standard_normal((2, t, dims)).astype(np.float32))
        mask = "causal" if t > 1 else None
        a, b = block(x, mask, caches[0]), patched(x, mask, caches[1])
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    decode = [ndim for batch, ndim in seen if batch == 2 and ndim is not None]
    assert decode and all(n == 0 for n in decode)  # every array offset 0-d (ints at prefill)


def test_a_batch_caches_offsets_reach_the_block_as_data():
    """mlx-lm's BatchKVCache holds one offset per sequence as an array: the block passes
    it on as it is (no int of it is made) and answers as the unpatched block does."""
    from mlx_lm.models.cache import BatchKVCache
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    block = model.model.layers[0]
    patched = blocks.DecoderBlock(block)
    dims = block.self_attn.q_proj.weight.shape[1] * 32 // block.self_attn.q_proj.bits
    rng = np.random.default_rng(2)
    caches = (BatchKVCache([0, 0]), BatchKVCache([0, 0]))
    for t in (3, 1, 1):
        x = mx.array(rng.standard_normal((2, t, dims)).astype(np.float32))
        mask = "causal" if t > 1 else None
        a, b = block(x, mask, caches[0]), patched(x, mask, caches[1])
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_blocks_tracing_their_steps_leave_the_ops_own_traces_alone(monkeypatch):
    """Where kernels replay (here: the CPU with compile allowed, every call a built-in), a
    block's compiled halves run each op's traced function once per layer while tracing:
    not a new call each time, so the ops keep their traces (MAX_TRACES counts calls)."""
    from hlh_mlx import backends, runtime
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))
    monkeypatch.setattr(runtime, "MAX_TRACES", 2)
    tuned.refresh()
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    before = _decode(model)
    patching.patch(model)
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(before), rtol=1e-4, atol=1e-4)
    used = [d for d in runtime._dispatches if d._traces]
    assert used and not any(d._untraced for d in used)
    assert any(d._traces > len(d._signatures) for d in used)  # traced again inside the halves
