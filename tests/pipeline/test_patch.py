"""hlh_mlx.patch on real mlx-lm model classes (small configs, random weights): patched and
unpatched logits agree, and the tuned kernels really run (on the emulator, selected by
hand-written timing fields in a temporary store: the emulator measures no speed)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import hlh_mlx
from hlh_mlx import tuned
from hlh_mlx import nn as hnn

from .test_tuned import variant, write

def small(kind):
    from mlx_lm.models import llama, qwen2  # mlx-lm is in the test extra
    mod = {"llama": llama, "qwen2": qwen2}[kind]
    args = mod.ModelArgs(model_type=kind, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                         num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=97, num_key_value_heads=2)
    model = mod.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(autouse=True)
def tuned_on_emulator(store_dir):
    # tuned near the model's own sizes (5 tokens, hidden 64, MLP 128): a winner is not
    # extrapolated more than tuned.MAX_EXTRAPOLATION times in bytes
    write(store_dir, "rms_norm", {"R": 8, "C": 64}, "float32", variant("rms_norm", "rows"), 0.5, 1.0)
    write(store_dir, "swiglu", {"R": 8, "C": 128}, "float32", variant("swiglu", "elementwise"), 0.5, 1.0)
    tuned.refresh()
    yield
    tuned.refresh()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_patched_model_gives_the_same_logits(kind):
    model = small(kind)
    tokens = mx.array([[3, 14, 15, 92, 65]])
    before = model(tokens)
    report = hlh_mlx.patch(model)
    replaced = {path for path, _, _ in report.replaced}
    assert "model.norm" in replaced and "model.layers.0.mlp" in replaced and "model.layers.1.input_layernorm" in replaced
    assert "model.layers.0.self_attn.rope" in replaced and "model.layers.0.self_attn.q_proj" in replaced
    assert "model.layers.0.mlp.gate_proj" in replaced  # the SwiGLU's projections are patched too
    assert isinstance(model.model.layers[0].mlp, hnn.SwiGLU) and isinstance(model.model.norm, hnn.RMSNorm)
    after = model(tokens)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert not [k for k in tuned.fallbacks() if k[0] in ("rms_norm", "swiglu")]  # the kernels ran


def test_unmappable_layers_are_kept_and_reported():
    class Odd(nn.Module):  # named like an MLP, computes something else
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

        def __call__(self, x):
            return self.down_proj(self.gate_proj(x) + self.up_proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.mlp = Odd()

    net = Net()
    x = mx.array(np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32))
    before = net.ln(x)
    report = hlh_mlx.patch(net)
    replaced = [p for p, _, _ in report.replaced]
    assert "ln" in replaced and "mlp" not in replaced and isinstance(net.ln, hnn.LayerNorm)
    np.testing.assert_allclose(np.asarray(net.ln(x)), np.asarray(before), rtol=1e-5, atol=1e-6)
    kept = {p: why for p, _, why in report.kept}
    assert "is not down(silu(gate(x)) * up(x))" in kept["mlp"] and "max abs error" in kept["mlp"]
    assert isinstance(net.mlp, Odd)


def test_drop_in_rms_norm_loads_mlx_weights():
    ref = nn.RMSNorm(64)
    ref.weight = mx.array(np.random.default_rng(0).standard_normal(64).astype(np.float32))
    mine = hnn.RMSNorm(64)
    mine.load_weights(list(ref.parameters().items()))
    x = mx.array(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(mine(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-6)
