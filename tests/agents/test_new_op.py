"""What AGENTS.md and the author-template skill promise an agent: a new op with two outputs,
one of them integer, added as one op module and one template, is checked, swept, called
through hlh_mlx.tuned (its own binding, fallback and the kernel), and exported, with no
change anywhere else in the package. The op: the maximum of each row and its index.

Runs on a copy of the package (the op module goes where the skill says, hlh_mlx/ops/),
in a fresh process, with its own results store."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ..pipeline.conftest import ROOT

OP_MODULE = '''
"""rowmax: the largest value of each row of x (R, C) and its column, as mx.max and
mx.argmax compute them (uint32 indices)."""

import mlx.core as mx

from .spec import ROUNDED_ONCE, Call, OpSpec, as_shape, dtype_name, random_array


def rowmax(x):
    """(values, indices) of the maximum of each row."""
    return mx.max(x, axis=-1), mx.argmax(x, axis=-1).astype(mx.uint32)


def bind(x):
    if x.ndim < 1:
        return "needs at least one dimension"
    c = x.shape[-1]
    return Call([as_shape(x, (x.size // c, c))], {"R": x.size // c, "C": c}, dtype_name(x.dtype),
                [x.shape[:-1], x.shape[:-1]], finish=lambda outs: (outs[0], outs[1]))


OP = OpSpec(
    name="rowmax",
    dims=("R", "C"),
    make_inputs=lambda s, dtype, rng: [random_array(rng, (s["R"], s["C"]), dtype)],
    reference=lambda x: list(rowmax(x)),
    output_shapes=lambda s: [(s["R"],), (s["R"],)],
    output_dtypes=lambda dtype: [dtype, mx.uint32],
    tolerance=ROUNDED_ONCE,
    bytes=lambda s, size: s["R"] * s["C"] * size,
    flops=lambda s: s["R"] * s["C"],
    shapes=[{"R": 4096, "C": 4096}],
    emulator_shapes=[{"R": 16, "C": 300}],
    edge_shapes=[{"R": 1, "C": 1}, {"R": 3, "C": 1001}],
    bind=bind,
    function=rowmax,
    export_dims={"R": "x.shape[0]", "C": "x.shape[1]"},
    export_outputs=["(R,)", "(R,)"],
)
'''

TEMPLATE = '''{#
[meta]
op = "rowmax"
inputs = ["x"]
outputs = ["vals", "idx"]
summary = "One thread per row, a serial scan."

[params]
TG = [32, 64]

[launch]
grid = ["R", "1", "1"]
threadgroup = ["TG", "1", "1"]

[template_args]
T = "dtype"
#}
uint row = thread_position_in_grid.x;
uint C = x_shape[1];
if (row < x_shape[0]) {
    float best = float(x[row * C]);
    uint at = 0;
    for (uint c = 1; c < C; c++) {
        float v = float(x[row * C + c]);
        if (v > best) { best = v; at = c; }
    }
    vals[row] = T(best);
    idx[row] = at;
}
'''

SCRIPT = '''
import mlx.core as mx, numpy as np
from hlh_mlx import store, templates, timing, tuned, variants

x = mx.array(np.random.default_rng(5).standard_normal((2, 8, 300)).astype(np.float32))
want = (mx.max(x, axis=-1), mx.argmax(x, axis=-1).astype(mx.uint32))
got = tuned.rowmax(x)                      # nothing tuned: the built-in, and why
assert "no stored rowmax variant" in tuned.explain("rowmax", x), tuned.explain("rowmax", x)
assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
# a timing record that makes the variant win (the emulator times nothing): the kernel now runs
v = variants.expand(next(t for t in templates.discover("rowmax")))[0]
common = {"op": "rowmax", "device": "emulator", "backend": "emulator", "shape": {"R": 16, "C": 300},
          "dtype": "float32", "shape_str": "16x300", "mlx": mx.__version__, "status": "ok",
          "timing_method": timing.METHOD}
path = store.path_for("emulator", "rowmax")
store.append(path, {**common, "variant_id": None, "template": "builtin", "correct": True, "timing": {"median_ms": 1.0}})
store.append(path, {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict,
                    "source_hash": v.source_hash, "correct": True, "timing": {"median_ms": 0.5}})
tuned.refresh()
assert f"variant {v.id}" in tuned.explain("rowmax", x), tuned.explain("rowmax", x)
got = tuned.rowmax(x)
assert got[1].dtype == mx.uint32 and got[0].shape == (2, 8)
assert all(mx.array_equal(a, b).item() for a, b in zip(got, want)), (got, want)
assert tuned.fallbacks() == {}  # counted since the refresh: the kernel ran
print("tuned ok", v.id)
'''


@pytest.fixture
def repo(tmp_path):
    """A copy of the package and templates with the new op added, as an agent would add it."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "hlh_mlx", root / "hlh_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "templates", root / "templates")
    (root / "hlh_mlx" / "ops" / "rowmax.py").write_text(OP_MODULE)
    (root / "templates" / "rowmax").mkdir()
    (root / "templates" / "rowmax" / "scan.metal.j2").write_text(TEMPLATE)
    return root


def _run(repo, *args, script=None):
    env = dict(os.environ, PYTHONPATH=str(repo), HLH_MLX_VARIANTS=str(repo / "variants"))
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "hlh_mlx", *args]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def test_an_agents_op_with_an_integer_second_output_is_first_class(repo, tmp_path):
    r = _run(repo, "check", "rowmax", "--dtype", "float32", "--dtype", "float16")
    assert r.returncode == 0 and "4 passed, 0 failed" in r.stdout, r.stdout + r.stderr
    r = _run(repo, "sweep", "rowmax")
    assert r.returncode == 0 and "(0 incorrect or failed)" in r.stdout + r.stderr, r.stdout + r.stderr
    r = _run(repo, script=SCRIPT)
    assert r.returncode == 0 and "tuned ok" in r.stdout, r.stdout + r.stderr
    vid = r.stdout.split("tuned ok")[1].split()[0]
    out = tmp_path / "rowmax_kernel.py"
    r = _run(repo, "export", "rowmax", "--variant", vid, "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    use = textwrap.dedent(f"""
        import sys, mlx.core as mx, numpy as np
        from hlh_mlx import emulator
        emulator.install()
        sys.path.insert(0, {str(tmp_path)!r})
        import rowmax_kernel
        x = mx.array(np.random.default_rng(9).standard_normal((5, 77)).astype(np.float32))
        vals, idx = rowmax_kernel.rowmax(x)
        assert idx.dtype == mx.uint32 and mx.array_equal(idx, mx.argmax(x, axis=-1).astype(mx.uint32)).item()
        assert mx.array_equal(vals, mx.max(x, axis=-1)).item()
        print("export ok")
    """)
    r = _run(repo, script=use)
    assert r.returncode == 0 and "export ok" in r.stdout, r.stdout + r.stderr


def test_a_kernel_that_leaves_an_index_unwritten_is_caught(repo):
    text = (repo / "templates" / "rowmax" / "scan.metal.j2").read_text()
    (repo / "templates" / "rowmax" / "scan.metal.j2").write_text(
        text.replace("    idx[row] = at;\n", "    if (row > 0) idx[row] = at;\n"))
    r = _run(repo, "check", "rowmax", "--dtype", "float32")
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr
