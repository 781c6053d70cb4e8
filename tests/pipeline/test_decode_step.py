"""hlh_mlx.decode_step.DecodeStack: a patched model's whole one-token step as one compiled
call over mlx-lm's KV cache, same logits and tokens, one trace per cache buffer size, the
cache left as mlx-lm's own code leaves it, everything else run by the model itself."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from hlh_mlx import blocks, decode_step, models, patching, tuned, validate

from .test_blocks import _decode


@pytest.fixture(autouse=True)
def fresh(store_dir):
    tuned.refresh()
    yield
    tuned.refresh()


def _traces(monkeypatch) -> list:
    """Counts the stack's traces: runs of its step's Python (a compiled replay runs none)."""
    made = []
    real = blocks._Compiled.__init__

    def counting(self, roots, fn):
        if roots and isinstance(roots[0], decode_step.DecodeStack):
            def traced(*a, _fn=fn):
                made.append(1)
                return _fn(*a)
            fn = traced
        real(self, roots, fn)
    monkeypatch.setattr(blocks._Compiled, "__init__", counting)
    return made


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen2-moe"])
def test_the_stack_decodes_the_same_logits_through_one_trace(name, monkeypatch):
    model, _ = models.load(name, bits=4, dtype="float32")
    before = _decode(model, steps=6)
    report = patching.patch(model)
    assert isinstance(model.model, decode_step.DecodeStack), report
    assert ("model", patching.STACKED) in report.notes
    traces = _traces(monkeypatch)
    model.model.layers[0].reset()  # patch's own check traced the step: trace it afresh here
    np.testing.assert_allclose(np.asarray(_decode(model, steps=6)), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert len(traces) == 1  # six steps, one trace: the offset is data, the cache one shape


def test_the_cache_grows_as_mlx_lm_grows_it_and_mlx_lm_goes_on_with_it(monkeypatch):
    """Decoding across the end of the cache's 256-row buffer grows it the way KVCache does
    (one retrace for the new size); after the fast steps a multi-token call (mlx-lm's own
    path) continues from the same cache with the same logits."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")

    def run():
        cache = make_prompt_cache(model)
        out = [model(mx.array([[t % 200 for t in range(252)]]), cache=cache)[:, -1]]
        for t in range(8):  # offsets 252..259: the buffer (256 rows) grows at 256
            out.append(model(mx.array([[t + 3]]), cache=cache)[:, -1])
        out.append(model(mx.array([[5, 6, 7]]), cache=cache)[:, -1])  # a chunk: the model's own path
        out.append(model(mx.array([[9]]), cache=cache)[:, -1])
        return mx.concatenate(out), cache
    want, want_cache = run()
    patching.patch(model)
    traces = _traces(monkeypatch)
    model.model.layers[0].reset()  # patch's own check traced the step: trace it afresh here
    got, cache = run()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert len(traces) == 2  # one per buffer size (256, then 512 rows)
    for c, w in zip(cache, want_cache):
        assert type(c) is KVCache and c.offset == w.offset == 264
        assert c.keys.shape == w.keys.shape  # grown in whole steps, as KVCache grows it
        np.testing.assert_allclose(np.asarray(c.keys[..., :c.offset, :]), np.asarray(w.keys[..., :w.offset, :]),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(c.values[..., :c.offset, :]),
                                   np.asarray(w.values[..., :w.offset, :]), rtol=1e-4, atol=1e-4)


def test_other_calls_run_the_model_itself(monkeypatch):
    """A batch of sequences, a quantized cache and input embeddings are not the stack's:
    the model's own code runs them (same results as unpatched, nothing traced)."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")

    def calls():
        cache = make_prompt_cache(model)
        a = model(mx.array([[3, 1, 4]] * 2), cache=cache)
        a2 = model(mx.array([[7]] * 2), cache=cache)
        qcache = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
        b = model(mx.array([[3, 1, 4]]), cache=qcache)
        b2 = model(mx.array([[7]]), cache=qcache)
        emb = model.model.embed_tokens(mx.array([[3, 1, 4]]))
        c = model.model(mx.array([[3, 1, 4]]), make_prompt_cache(model), input_embeddings=emb)
        return [np.asarray(x) for x in (a, a2, b, b2, c)]
    want = calls()
    patching.patch(model)
    traces = _traces(monkeypatch)
    for g, w in zip(calls(), want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert traces == []


def test_weights_loaded_after_patching_are_used_by_the_stack():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    twin, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model)
    _decode(model)  # traced with the old weights
    new = tree_map(lambda w: w * 1.5 if w.dtype == mx.float32 else w, dict(tree_flatten(model.parameters())))
    model.load_weights(list(new.items()))
    twin.load_weights(list(new.items()))
    np.testing.assert_allclose(np.asarray(_decode(model)), np.asarray(_decode(twin)), rtol=1e-4, atol=1e-4)


def test_a_replaced_layer_or_a_reset_block_is_traced_again(monkeypatch):
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model)
    _decode(model)
    traces = _traces(monkeypatch)
    _decode(model)
    assert traces == []
    model.model.layers[1].mlp = model.model.layers[0].mlp  # another module in a slot
    _decode(model)
    assert len(traces) == 1
    model.model.layers[0].reset()
    _decode(model)
    assert len(traces) == 2


def test_a_stack_that_computes_something_else_is_not_installed(monkeypatch):
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    inner = model.model
    real = blocks.masked_decode_attention
    monkeypatch.setattr(blocks, "masked_decode_attention", lambda q, k, v, m, s: real(q, k, v, m, s) * 2)
    report = patching.patch(model)
    kept = {p: why for p, _, why in report.kept}
    assert model.model is inner and "decode step not compiled whole: differs at decode step 1" in kept["model"]


def test_why_not_names_what_the_stack_does_not_run():
    model, _ = models.load("tiny-llama", bits=16, dtype="float32")  # blocks kept: not quantized
    report = patching.patch(model)
    kept = {p: why for p, _, why in report.kept}
    assert "not every layer is a decoder block" in kept["model"]
    assert decode_step.why_not(model) == "no embed_tokens, layers, norm"
    model4, _ = models.load("tiny-llama", bits=4, dtype="float32")
    patching.patch(model4)
    for b in model4.model.layers:
        object.__setattr__(b, "use_sliding", True)
    assert decode_step.why_not(model4.model._inner) == "sliding-window attention layers"


def test_unpatched_puts_the_models_own_stack_back():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    inner = model.model
    report = patching.patch(model)
    assert isinstance(model.model, decode_step.DecodeStack)
    with report.unpatched():
        assert model.model is inner and not any(isinstance(b, blocks.DecoderBlock) for b in inner.layers)
    assert isinstance(model.model, decode_step.DecodeStack)


def test_validate_compiles_the_unpatched_stack_too():
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    inner = model.model
    with validate.compiled_blocks(model):
        assert isinstance(model.model, decode_step.DecodeStack)
        assert all(isinstance(b, blocks.DecoderBlock) and not b._fused for b in model.model.layers)
    assert model.model is inner
