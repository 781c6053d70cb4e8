"""qmm, the 4-bit matmul of several rows (a prefill): its kernels dequantize the weight and
MLX's matmul multiplies (`OpSpec.then`); `tuned.quantized_matmul` serves one token through
qgemv and several rows through qmm (`OpSpec.also`). On the emulator, variants selected
through hand-written timing fields (the emulator measures no speed)."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import check, backends, ops, tuned
from hlh_mlx import nn as hnn
from hlh_mlx.cli import main

from .conftest import ROOT
from .test_tuned import variant, write

pytestmark = pytest.mark.usefixtures("tuned_fresh")


def quantized(rng, n, k, g, dtype=mx.float32):
    w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dtype)
    return mx.quantize(w, group_size=g, bits=4)


def builtin(x, wq, s, b, g):
    return mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=g, bits=4)


def test_several_rows_run_the_qmm_variant_and_one_token_stays_with_qgemv(store_dir, rng, monkeypatch):
    write(store_dir, "qmm", {"M": 8, "N": 64, "K": 512, "G": 64}, "float32", variant("qmm", "dequant"), 0.5, 1.0)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    tuned.refresh()
    wq, s, b = quantized(rng, 64, 512, 64)
    x = mx.array(rng.standard_normal((1, 6, 512)).astype(np.float32))  # (batch, rows, features), 6 rows
    y = tuned.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert y.shape == (1, 6, 64)
    np.testing.assert_allclose(np.asarray(y), np.asarray(builtin(x, wq, s, b, 64)), rtol=1e-4, atol=1e-4)
    assert "as qmm: variant" in tuned.explain("qgemv", x, wq, s, b, transpose=True, group_size=64, bits=4)
    # one token: qgemv's business, and no qgemv record here, so strict mode refuses it
    with pytest.raises(tuned.FallbackError, match="qgemv"):
        tuned.quantized_matmul(x[:, :1], wq, s, b, transpose=True, group_size=64, bits=4)


def test_a_prefill_through_quantized_linear_runs_qmm(store_dir, rng, monkeypatch):
    write(store_dir, "qmm", {"M": 8, "N": 64, "K": 512, "G": 128}, "float32", variant("qmm", "dequant"), 0.5, 1.0)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    tuned.refresh()
    ref = nn.QuantizedLinear(512, 64, bias=True, group_size=128, bits=4)
    ref.update({"bias": mx.array(rng.standard_normal(64).astype(np.float32))})
    layer = hnn.QuantizedLinear.from_layer(ref).eval()
    x = mx.array(rng.standard_normal((2, 5, 512)).astype(np.float32))  # 10 rows
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(ref(x)), rtol=1e-4, atol=1e-4)


def test_arguments_neither_op_takes_fall_back_with_both_reasons(rng):
    wq, s, b = quantized(rng, 64, 512, 64)
    x = mx.array(rng.standard_normal((4, 512)).astype(np.float32))
    why = tuned.explain("qgemv", x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert why.startswith("as qmm: built-in: no stored qmm variant")  # several rows: qmm's, nothing stored
    wq8, s8, b8 = mx.quantize(mx.array(rng.standard_normal((64, 512)).astype(np.float32)), group_size=64, bits=8)
    y = tuned.quantized_matmul(x, wq8, s8, b8, transpose=True, group_size=64, bits=8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(mx.quantized_matmul(x, wq8, s8, b8, group_size=64, bits=8)))
    assert "bits=4" in tuned.explain("qgemv", x, wq8, s8, b8, transpose=True, group_size=64, bits=8)


BROKEN = """{#
[meta]
op = "qmm"
inputs = ["x", "w", "scales", "biases"]
outputs = ["wd"]
summary = "dequantizes every packed word but the last"
[params]
TG = [64]
[launch]
grid = ["N * K // 8", "1", "1"]
threadgroup = ["TG", "1", "1"]
[template_args]
T = "dtype"
GS = "G"
#}
uint kw = w_shape[1];
uint i = thread_position_in_grid.x;
if (i + 1 < w_shape[0] * kw) {
    uint row = i / kw, g = row * scales_shape[1] + (i - row * kw) / (GS / 8);
    uint32_t q = w[i];
    for (uint t = 0; t < 8; t++) wd[i * 8 + t] = T(float(scales[g]) * float((q >> (4 * t)) & 15u) + float(biases[g]));
}
"""


def test_a_dequantizer_that_leaves_a_word_unwritten_is_caught_through_the_matmul(extra_templates, rng):
    from hlh_mlx import templates, variants
    extra_templates("qmm", "broken.metal.j2", BROKEN)
    t = next(t for t in templates.discover("qmm") if t.family == "broken")
    v = variants.expand(t)[0]
    op = ops.get("qmm")
    k = backends.Kernel(v, "emulator", sanitize=False)
    _, failure = check.check_shapes(k, op, v, op.emulator_shapes, "float32", rng)
    assert failure is not None and "NaN" in failure  # the poison reached the product
    good = variant("qmm", "dequant")
    _, failure = check.check_shapes(backends.Kernel(good, "emulator", sanitize=False), op, good,
                                    op.edge_shapes, "float32", rng)
    assert failure is None


def test_an_exported_qmm_kernel_multiplies_too(tmp_path):
    v = variant("qmm", "dequant")
    out = tmp_path / "kernel.py"
    r = CliRunner().invoke(main, ["export", "qmm", "--variant", v.id, "-o", str(out)])
    assert r.exit_code == 0, r.output
    script = f"""
import mlx.core as mx, numpy as np, sys
from hlh_mlx import emulator
emulator.install()
sys.path.insert(0, {str(tmp_path)!r})
import kernel
rng = np.random.default_rng(1)
x = mx.array(rng.standard_normal((7, 256)).astype(np.float32))
wq, s, b = mx.quantize(mx.array(rng.standard_normal((48, 256)).astype(np.float32)), group_size=64, bits=4)
y = kernel.qmm(x, wq, s, b)
ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
assert y.shape == (7, 48), y.shape
assert np.allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4), "wrong result"
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


def test_a_call_sent_to_qmm_counts_its_fallbacks_under_the_name_called(store_dir, rng):
    write(store_dir, "qmm", {"M": 8, "N": 64, "K": 512, "G": 64}, "float32", variant("qmm", "dequant"), 0.5, 1.0)
    tuned.refresh()
    wq, s, b = quantized(rng, 64, 512, 64)
    x = mx.array(rng.standard_normal((6, 512)).astype(np.float32))
    # inside mx.compile the emulator's kernels cannot run: the built-in answers, counted
    f = mx.compile(lambda x: tuned.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4))
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(builtin(x, wq, s, b, 64)), rtol=1e-5, atol=1e-5)
    mx.eval(tuned.quantized_matmul(x[:3], wq, s, b, transpose=True, group_size=64, bits=4))  # no record near 3 rows
    assert tuned.fallbacks() and {op for op, _ in tuned.fallbacks()} == {"qgemv"}


def test_export_refuses_a_then_that_names_what_the_template_does_not_take(extra_templates, monkeypatch):
    import dataclasses

    from hlh_mlx import export, templates, variants
    text = (ROOT / "templates" / "qmm" / "dequant.metal.j2").read_text()
    extra_templates("qmm", "renamed.metal.j2", text.replace('inputs = ["x",', 'inputs = ["a",'))
    t = next(t for t in templates.discover("qmm") if t.family == "renamed")
    v = variants.expand(t)[0]
    with pytest.raises(export.ExportError, match=r"export_then names \['x'\]"):
        export.render_module("qmm", v.id)
    real = ops.get
    bare = dataclasses.replace(real("qmm"), export_then="")
    monkeypatch.setattr(export.ops, "get", lambda name: bare if name == "qmm" else real(name))
    with pytest.raises(export.ExportError, match="no export_then"):
        export.render_module("qmm", variant("qmm", "dequant").id)


def test_where_only_qmm_is_tuned_one_token_goes_straight_to_the_builtin(store_dir, rng):
    """qgemv's direct path (no signature: the built-in) must not be lost because qmm has
    variants: its one-token calls are told apart by `takes`, the rest decided as before."""
    write(store_dir, "qmm", {"M": 8, "N": 64, "K": 512, "G": 64}, "float32", variant("qmm", "dequant"), 0.5, 1.0)
    tuned.refresh()
    wq, s, b = quantized(rng, 64, 512, 64)
    wq2, s2, b2 = quantized(rng, 32, 512, 64)
    one = mx.array(rng.standard_normal((1, 512)).astype(np.float32))
    for w in ((wq, s, b), (wq2, s2, b2), (wq, s, b)):  # two one-token signatures
        y = tuned.quantized_matmul(one, *w, transpose=True, group_size=64, bits=4)
        np.testing.assert_allclose(np.asarray(y), np.asarray(builtin(one, *w, 64)), rtol=1e-5, atol=1e-5)
    assert tuned.quantized_matmul.dispatch._direct is not None
    assert sum(tuned.fallbacks().values()) == 1  # the first decided, the second went straight through
    x = mx.array(rng.standard_normal((6, 512)).astype(np.float32))  # several rows: still qmm's variant
    np.testing.assert_allclose(np.asarray(tuned.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)),
                               np.asarray(builtin(x, wq, s, b, 64)), rtol=1e-4, atol=1e-4)
    assert sum(tuned.fallbacks().values()) == 1 and "as qmm: variant" in tuned.explain(
        "qgemv", x, wq, s, b, transpose=True, group_size=64, bits=4)
    assert ops.get("qgemv").takes(mx.array(1.0)) and not ops.get("qgemv").takes(x)


def test_a_prefill_fallback_does_not_hide_the_first_decode_fallback(store_dir, rng):
    """The router goes in when one of qgemv's own calls falls back, so that call is decided
    and counted; a several-row fallback first must not install it."""
    write(store_dir, "qmm", {"M": 8, "N": 64, "K": 512, "G": 64}, "float32", variant("qmm", "dequant"), 0.5, 1.0)
    tuned.refresh()
    wq, s, b = quantized(rng, 64, 512, 64)
    kw = dict(transpose=True, group_size=64, bits=4)
    many = mx.array(rng.standard_normal((100, 512)).astype(np.float32))  # no qmm record within 2x of 100 rows
    mx.eval(tuned.quantized_matmul(many, wq, s, b, **kw))
    assert sum(tuned.fallbacks().values()) == 1 and tuned.quantized_matmul.dispatch._direct is None
    one = mx.array(rng.standard_normal((1, 512)).astype(np.float32))
    mx.eval(tuned.quantized_matmul(one, wq, s, b, **kw))
    assert sum(tuned.fallbacks().values()) == 2 and tuned.quantized_matmul.dispatch._direct is not None
    router = tuned.quantized_matmul.dispatch._direct
    mx.eval(tuned.quantized_matmul(many[:90], wq, s, b, **kw))  # another several-row fallback, through it
    assert sum(tuned.fallbacks().values()) == 3 and tuned.quantized_matmul.dispatch._direct is router
