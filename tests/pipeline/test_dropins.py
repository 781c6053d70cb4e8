"""The new tuned ops as drop-ins (rope, gemv, 4-bit quantized gemv, decode attention) and
the gradients of tuned norms, SwiGLU and RoPE, on the emulator: tuned variants are selected
through hand-written timing fields (the emulator measures no speed), then the real
templates run and are compared with MLX; gradients are checked by finite differences."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import hlh_mlx
from hlh_mlx import nn as hnn
from hlh_mlx import tuned

from .test_tuned import variant, write


def arr(rng, *shape, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


@pytest.fixture(autouse=True)
def tuned_on_emulator(store_dir, monkeypatch):
    monkeypatch.setenv("HLH_MLX_STRICT", "1")  # a fallback anywhere below is a failure
    for trad in (0, 1):  # a layout is a switch of the op: each has its own records
        write(store_dir, "rope", {"R": 4, "T": 16, "D": 64, "TRAD": trad}, "float32", variant("rope", "pairs"), 0.5, 1.0)
    write(store_dir, "gemv", {"M": 1, "N": 64, "K": 512}, "float32", variant("gemv", "simd"), 0.5, 1.0)
    write(store_dir, "qgemv", {"N": 64, "K": 512, "G": 64}, "float32", variant("qgemv", "simd"), 0.5, 1.0)
    write(store_dir, "decode_attention", {"HQ": 8, "HKV": 2, "L": 100, "D": 64}, "float32",
          variant("decode_attention", "simd"), 0.5, 1.0)
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), 0.5, 1.0)
    write(store_dir, "layer_norm", {"R": 8, "C": 512}, "float32", variant("layer_norm", "rows"), 0.5, 1.0)
    write(store_dir, "swiglu", {"R": 4, "C": 1000}, "float32", variant("swiglu", "elementwise"), 0.5, 1.0)
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", variant("softmax", "rows"), 0.5, 1.0)
    write(store_dir, "gelu", {"N": 4096}, "float32", variant("gelu", "elementwise"), 0.5, 1.0)
    tuned.refresh()
    yield
    tuned.refresh()


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_layer_matches_mlx_with_offsets(rng, traditional):
    ref = nn.RoPE(64, traditional=traditional, base=10000.0)
    mine = hnn.RoPE(64, traditional=traditional, base=10000.0)
    x = arr(rng, 1, 4, 9, 64)  # within 2x of the tuned 4x16x64 in every dimension
    for offset in (0, 5):
        close(mine(x, offset=offset), ref(x, offset=offset), 5e-5)
    assert "variant" in tuned.explain("rope", x, 64, traditional=traditional, base=10000.0, scale=1.0, offset=5)


def test_a_rope_layout_is_never_served_by_the_other_layouts_record(store_dir, rng):
    """The selection crosses sizes (within 2x) but never an op's switch: a variant timed
    at the non-traditional layout says nothing of the traditional one's speed, nor of
    its built-in's."""
    write(store_dir, "rope", {"R": 4, "T": 16, "D": 64, "TRAD": 0}, "float16", variant("rope", "pairs"), 0.5, 1.0)
    tuned.refresh()
    x = arr(rng, 1, 4, 9, 64).astype(mx.float16)
    assert "variant" in tuned.explain("rope", x, 64, traditional=False, base=10000.0, scale=1.0, offset=5)
    why = tuned.explain("rope", x, 64, traditional=True, base=10000.0, scale=1.0, offset=5)
    assert why.startswith("built-in: no stored rope variant")
    assert "tuned only with other settings of TRAD, at 4x16x64x0: sweep --shape 4x9x64x1 to tune this call's TRAD=1" \
        in why, why


def test_linear_layer_uses_gemv_for_a_token_and_loads_mlx_weights(rng):
    ref = nn.Linear(512, 64)
    mine = hnn.Linear(512, 64)
    mine.load_weights(list(ref.parameters().items()))
    x = arr(rng, 1, 1, 512)
    close(mine(x), ref(x), 1e-4)
    big = arr(rng, 16, 512)
    close(mine(big), ref(big), 1e-4)  # 16 rows: MLX's matmul, no fallback recorded


@pytest.mark.parametrize("group_size", [64, 128])
def test_quantized_linear_layer_matches_mlx(rng, group_size):
    ref = nn.QuantizedLinear(512, 64, bias=True, group_size=group_size, bits=4)
    ref.update({"bias": arr(rng, 64)})
    mine = hnn.QuantizedLinear.from_layer(ref)
    x = arr(rng, 1, 512)
    close(mine(x), ref(x), 1e-4)


def test_decode_attention_matches_mlx_with_gqa(rng):
    q, k, v = arr(rng, 1, 8, 1, 64), arr(rng, 1, 2, 90, 64), arr(rng, 1, 2, 90, 64)
    got = tuned.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(64))
    close(got, mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(64)), 1e-5)


def test_unsupported_arguments_fall_back_visibly(rng, monkeypatch):
    monkeypatch.delenv("HLH_MLX_STRICT")
    x = arr(rng, 1, 4, 7, 64)
    out = tuned.rope(x, 32, traditional=False, base=10000.0, scale=1.0, offset=0)  # partial rotation
    close(out, mx.fast.rope(x, 32, traditional=False, base=10000.0, scale=1.0, offset=0))
    assert any(k[0] == "rope" and "whole last dimension" in k[1] for k in tuned.fallbacks())


def _fd_check(name, f, arrays, rng, h=1e-2, directions=2):
    """Directional derivatives of sum(f(*arrays) * c) by central differences vs mx.grad. The
    difference of the two sides' outputs is summed in float64: a float32 loss's rounding,
    divided by 2h, was half of the worst error seen (0.42 of the bound over 200 seeds;
    0.21 summed in float64)."""
    c = arr(rng, *f(*arrays).shape)
    loss = lambda *xs: mx.sum(f(*xs) * c)  # noqa: E731
    grads = mx.grad(loss, argnums=list(range(len(arrays))))(*arrays)
    grads = (grads,) if isinstance(grads, mx.array) else grads  # one argument: a bare array
    c64 = np.asarray(c, dtype=np.float64)
    for _ in range(directions):
        d = [arr(rng, *a.shape) for a in arrays]
        plus = np.asarray(f(*[a + h * e for a, e in zip(arrays, d)]), dtype=np.float64)
        minus = np.asarray(f(*[a - h * e for a, e in zip(arrays, d)]), dtype=np.float64)
        numeric = float(((plus - minus) * c64).sum()) / (2 * h)
        analytic = sum(mx.sum(g * e).item() for g, e in zip(grads, d))
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (name, numeric, analytic)


def test_gradients_of_tuned_ops_match_finite_differences(rng):
    x, w, b = arr(rng, 8, 512), arr(rng, 512), arr(rng, 512)
    _fd_check("rms_norm", lambda x, w: tuned.rms_norm(x, w, 1e-5), [x, w], rng)
    _fd_check("layer_norm", lambda x, w, b: tuned.layer_norm(x, w, b, 1e-5), [x, w, b], rng)
    _fd_check("swiglu", tuned.swiglu, [arr(rng, 4, 1000), arr(rng, 4, 1000)], rng)
    _fd_check("rope", lambda x: tuned.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=3),
              [arr(rng, 4, 16, 64)], rng)
    assert tuned.fallbacks() == {}


def test_every_tuned_kernel_carries_the_builtins_derivatives(rng):
    """A kernel's outputs have no derivative of their own (MLX raises for a custom kernel; the
    emulator too): every tuned call carries its built-in's VJP, so mx.grad through softmax,
    GELU, gemv, the 4-bit gemv (for x; the packed weights are integers) and the norms gives
    the built-in's, never zeros. Forward mode (mx.jvp) raises, as for any custom kernel."""
    x8, w = arr(rng, 8, 512), arr(rng, 512)
    v, W = arr(rng, 1, 512), arr(rng, 64, 512)
    wq, sq, bq = mx.quantize(arr(rng, 64, 512), group_size=64, bits=4)
    qkw = dict(transpose=True, group_size=64, bits=4)
    cases = [(lambda a: tuned.softmax(a, axis=-1), lambda a: mx.softmax(a, axis=-1), x8),
             (tuned.gelu, nn.gelu, arr(rng, 4096)),
             (lambda a: tuned.gemv(a, W), lambda a: a @ W.T, v),
             (lambda a: tuned.quantized_matmul(a, wq, sq, bq, **qkw), lambda a: mx.quantized_matmul(a, wq, sq, bq, **qkw),
              v),
             (lambda a: tuned.rms_norm(a, w, 1e-5), lambda a: mx.fast.rms_norm(a, w, 1e-5), x8)]
    for ours, builtin, a in cases:
        c = arr(rng, *builtin(a).shape)
        g, want = (mx.grad(lambda a, f=f: (f(a) * c).sum())(a) for f in (ours, builtin))
        assert float(mx.abs(want).max()) > 0
        close(g, want, 1e-4)
        with pytest.raises(ValueError, match="jvp not implemented"):
            mx.eval(mx.jvp(ours, [a], [arr(rng, *a.shape)]))
    assert tuned.fallbacks() == {}  # the kernels ran


def test_layers_in_eval_mode_run_without_derivatives_and_say_so_when_one_is_taken(rng):
    """hlh_mlx.nn layers in eval mode (and patched blocks) run `no_grad` kernels, one graph
    node fewer for inference; a gradient through one raises, as MLX does for a custom
    kernel, never a silent zero; in training mode the gradient is the built-in's."""
    layer = hnn.RMSNorm(512)
    x = arr(rng, 8, 512)
    layer.eval()
    with pytest.raises(ValueError, match="vjp not implemented"):
        mx.eval(mx.grad(lambda a: layer(a).sum())(x))
    lin = hnn.Linear(512, 64, bias=False)
    qlin = hnn.QuantizedLinear.from_layer(nn.QuantizedLinear(512, 64, bias=False, group_size=64, bits=4))
    for proj in (lin, qlin):  # the projections of a patched model too (patch swaps these in)
        proj.eval()
        with pytest.raises(ValueError, match="vjp not implemented"):
            mx.eval(mx.grad(lambda a, p=proj: p(a).sum())(arr(rng, 1, 512)))
    layer.train()
    close(mx.grad(lambda a: (layer(a) * x).sum())(x),
          mx.grad(lambda a: (mx.fast.rms_norm(a, layer.weight, layer.eps) * x).sum())(x), 1e-4)


def _raises_as_the_builtin(ours, builtin):
    with pytest.raises(Exception) as want:
        mx.eval(builtin())
    with pytest.raises(type(want.value)) as got:
        mx.eval(ours())
    assert str(got.value) == str(want.value)


def test_what_the_builtin_refuses_a_served_call_refuses_with_its_error(rng):
    """Where a variant serves the shapes, arguments the built-in refuses (an unknown keyword,
    a float axis, a None for a bool, a stream this machine has not, an offset of two
    dimensions) raise the built-in's own error, in strict mode too (this file's), never run
    the kernel or turn into a FallbackError."""
    x8, w = arr(rng, 8, 512), arr(rng, 512)
    xr = arr(rng, 1, 4, 16, 64)
    rk = dict(traditional=False, base=10000.0, scale=1.0)
    tuned.softmax(x8, axis=-1)  # decided: a variant serves this shape (and -1.0 == -1 must not share it)
    tuned.rope(xr, 64, traditional=True, base=1e4, scale=1.0, offset=0)  # and 1 == True must not share this
    cases = [(lambda: tuned.softmax(x8, axis=-1, nope=1), lambda: mx.softmax(x8, axis=-1, nope=1)),
             (lambda: tuned.softmax(x8, axis=-1.0), lambda: mx.softmax(x8, axis=-1.0)),
             (lambda: tuned.softmax(x8, axis=-1, precise=None), lambda: mx.softmax(x8, axis=-1, precise=None)),
             (lambda: tuned.softmax(x8, axis=5), lambda: mx.softmax(x8, axis=5)),
             (lambda: tuned.rms_norm(x8, w, 1e-5, foo=1), lambda: mx.fast.rms_norm(x8, w, 1e-5, foo=1)),
             (lambda: tuned.rope(xr, 64, traditional=1, base=1e4, scale=1.0, offset=0),
              lambda: mx.fast.rope(xr, 64, traditional=1, base=1e4, scale=1.0, offset=0)),
             (lambda: tuned.rope(xr, 64, offset=mx.array([[5]]), **rk),
              lambda: mx.fast.rope(xr, 64, offset=mx.array([[5]]), **rk))]
    if not mx.metal.is_available() and not mx.cuda.is_available():
        cases.append((lambda: tuned.rms_norm(x8, w, 1e-5, stream=mx.gpu),
                      lambda: mx.fast.rms_norm(x8, w, 1e-5, stream=mx.gpu)))
    for ours, builtin in cases:
        _raises_as_the_builtin(ours, builtin)
    assert tuned.fallbacks() == {}


def test_a_served_call_on_a_stream_or_with_a_wide_offset_runs_the_builtin(rng, monkeypatch):
    monkeypatch.delenv("HLH_MLX_STRICT")
    x8, w = arr(rng, 8, 512), arr(rng, 512)
    close(tuned.rms_norm(x8, w, 1e-5, stream=mx.cpu), mx.fast.rms_norm(x8, w, 1e-5))
    for _ in range(3):  # a new Stream object each call (MLX hashes them by identity): one plan, counted once
        close(tuned.rms_norm(x8, w, 1e-5, stream=mx.default_stream(mx.cpu)), mx.fast.rms_norm(x8, w, 1e-5))
    assert len(tuned.rms_norm.plans) == 2
    assert sum(n for (op, why), n in tuned.fallbacks().items() if op == "rms_norm") == 2
    xr = arr(rng, 1, 4, 16, 64)
    rk = dict(traditional=False, base=10000.0, scale=1.0)
    off = mx.array(2 ** 31 + 5, dtype=mx.uint32)  # would wrap in the kernel's int32
    close(tuned.rope(xr, 64, offset=off, **rk), mx.fast.rope(xr, 64, offset=off, **rk))
    reasons = " ".join(why for _, why in tuned.fallbacks())
    assert "a stream given" in reasons and "kernels take int32 offsets" in reasons


@pytest.mark.parametrize("shape", [(), (2, 0)])
def test_a_linear_layer_answers_as_mlx_for_a_0d_or_featureless_input(shape):
    ours, theirs = hnn.Linear(1, 4), nn.Linear(1, 4)
    if shape:  # no input features: the output is the bias
        theirs.weight = mx.zeros((4, 0))
    ours.update(theirs.parameters())
    x = mx.zeros(shape)
    try:
        want = theirs(x)
    except ValueError:
        _raises_as_the_builtin(lambda: ours(x), lambda: theirs(x))
        return
    close(ours(x), want)


def test_an_op_and_its_no_grad_twin_count_one_call_once(rng, monkeypatch):
    monkeypatch.delenv("HLH_MLX_STRICT")
    x = arr(rng, 3, 100)  # no variant at this shape: a fallback
    for f in (tuned.gelu, tuned.gelu.no_grad, tuned.gelu):
        close(f(x), nn.gelu(x))
    assert sum(n for (op, _), n in tuned.fallbacks().items() if op == "gelu") == 1


def test_patch_swaps_rope_linear_and_quantized_linear():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.rope = nn.RoPE(64)
            self.proj = nn.Linear(512, 64)
            self.qproj = nn.QuantizedLinear(512, 64, group_size=64, bits=4)
            self.q8 = nn.QuantizedLinear(512, 64, group_size=64, bits=8)

    net = Block()
    report = hlh_mlx.patch(net)
    replaced = {p: new for p, _, new in report.replaced}
    assert replaced == {"rope": "hlh_mlx.nn.RoPE", "proj": "hlh_mlx.nn.Linear", "qproj": "hlh_mlx.nn.QuantizedLinear"}
    assert "4-bit" in dict((p, why) for p, _, why in report.kept)["q8"]


def test_patch_recognizes_the_mlp_of_a_quantized_model(monkeypatch):
    monkeypatch.delenv("HLH_MLX_STRICT")

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(128, 256), nn.Linear(128, 256), nn.Linear(256, 128)

        def __call__(self, x):
            return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    net = Net()
    nn.quantize(net, group_size=64, bits=4)  # weights become uint32: the check must still use float inputs
    report = hlh_mlx.patch(net)
    assert isinstance(net.mlp, hnn.SwiGLU), str(report)
    assert isinstance(net.mlp.gate_proj, hnn.QuantizedLinear)
