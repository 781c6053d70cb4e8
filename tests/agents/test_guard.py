"""`hlh_mlx guard` catches each known trick on a planted example, naming the line, and
passes the shipped templates and an honest kernel file."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hlh_mlx import guard
from hlh_mlx.cli import main

from ..pipeline.conftest import ROOT, copy_template

HONEST = """
import mlx.core as mx

_kernel = mx.fast.metal_kernel(name="k", input_names=["x"], output_names=["y"], source="y[0] = x[0];")

def custom_kernel(data):
    x = data
    if x.ndim != 1:
        raise ValueError("expected a vector")
    return _kernel(inputs=[x], grid=(x.size, 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[x.shape], output_dtypes=[x.dtype])[0]
"""

CHEATS = {  # name: (finding kind, file text, line of the trick)
    "patched-timer": ("patched-timer", "import time\ntime.perf_counter = lambda: 0.0\n", 2),
    "patched-timer-mx": ("patched-timer", "import mlx.core as mx\nmx.synchronize = lambda *a: None\n", 2),
    "patched-timer-setattr": ("patched-timer", "import mlx.core as mx\nsetattr(mx, 'eval', print)\n", 2),
    "identity-cache": ("identity-cache", "_c = {}\ndef custom_kernel(x):\n    k = id(x)\n    return _c.setdefault(k, x * 2)\n", 3),
    "identity-cache-ptr": ("identity-cache", "def custom_kernel(x):\n    return x.__array_interface__['data'][0]\n", 2),
    "identity-cache-lru": ("identity-cache", "import functools\n@functools.lru_cache\ndef custom_kernel(x):\n    return x\n", 2),
    "hard-coded-shape": ("hard-coded-shape", "def custom_kernel(x):\n    if x.shape == (4096, 4096):\n        return x\n    return x\n", 2),
    "hard-coded-shape-dim": ("hard-coded-shape", "def custom_kernel(x):\n    if x.shape[0] == 8192:\n        return x\n    return x\n", 2),
    "builtin-fallback": ("builtin-fallback", "import mlx.core as mx\ndef custom_kernel(a, b):\n    try:\n        return fast(a, b)\n"
                         "    except Exception:\n        return mx.matmul(a, b)\n", 6),
    "builtin-fallback-from": ("builtin-fallback", "from mlx.core import softmax\ndef f(x):\n    try:\n        return g(x)\n"
                              "    except RuntimeError:\n        return softmax(x)\n", 6),
    "stream": ("stream", "import mlx.core as mx\ns = mx.new_stream(mx.gpu)\n", 2),
    "stream-kw": ("stream", "import mlx.core as mx\ndef f(x, s):\n    return mx.exp(x, stream=s)\n", 3),
}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_each_trick_is_caught_with_its_line(tmp_path, name):
    kind, text, line = CHEATS[name]
    p = tmp_path / f"{name}.py"
    p.write_text(text)
    found = guard.scan_python(p)
    assert any(f.kind == kind and f.line == line for f in found), found


def test_honest_kernel_file_passes(tmp_path):
    p = tmp_path / "honest.py"
    p.write_text(HONEST)
    assert guard.scan_python(p) == []


def test_cli_guard_fails_on_a_cheat_and_names_file_and_line(tmp_path):
    p = tmp_path / "submission.py"
    p.write_text(CHEATS["builtin-fallback"][1])
    r = CliRunner().invoke(main, ["guard", str(p)])
    assert r.exit_code == 1 and f"{p}:6: builtin-fallback" in r.output


def test_guard_passes_the_shipped_metal_templates():
    r = CliRunner().invoke(main, ["guard", str(ROOT / "templates")])
    assert r.exit_code == 0, r.output
    assert "guard: 0 finding(s)" in r.output


def test_guard_catches_a_template_that_skips_outputs(tmp_path):
    p = tmp_path / "matmul" / "lazy.metal.j2"
    p.parent.mkdir()
    p.write_text(copy_template("naive.metal.j2").replace("if (row >= M || col >= N) return;",
                                                         "if (row >= M || col >= N || row == 0) return;"))
    r = CliRunner().invoke(main, ["guard", str(p)])
    assert r.exit_code == 1 and "wrong-or-unwritten" in r.output and "unwritten" in r.output


def test_guard_catches_a_host_escape_in_a_template(tmp_path):
    p = tmp_path / "matmul" / "escape.metal.j2"
    p.parent.mkdir()
    p.write_text(copy_template("naive.metal.j2").replace("float acc = 0.0f;", 'float acc = 0.0f; system("id");'))
    r = CliRunner().invoke(main, ["guard", str(p)])
    assert r.exit_code == 1 and "host-escape" in r.output and "system" in r.output


def test_guard_shows_counts_and_an_eta_when_piped(tmp_path):
    """`guard templates/matmul` was silent for minutes when piped: progress goes to stderr
    (one line per item here), the findings and the exit status stay what they were."""
    d = tmp_path / "submission"
    (d / "gelu").mkdir(parents=True)
    (d / "honest.py").write_text(HONEST)
    (d / "cheat.py").write_text(CHEATS["stream"][1])
    (d / "gelu" / "elementwise.metal.j2").write_text((ROOT / "templates" / "gelu" / "elementwise.metal.j2").read_text())
    r = subprocess.run([sys.executable, "-m", "hlh_mlx", "guard", str(d)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr
    # two python files and the two sampled variants of the template
    assert "guarding: 0/4" in r.stderr and "guarding: 4/4 (100%)" in r.stderr, r.stderr
    assert "guarding: 3/4 (75%)" in r.stderr and "eta" in r.stderr, r.stderr
    expected = [str(f) for f in guard.scan([d])] + [f"guard: 1 finding(s) in {d}"]
    assert r.stdout.splitlines() == expected and "stream" in expected[0]
