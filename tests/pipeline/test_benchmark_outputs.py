"""Benchmark scripts never overwrite a tracked file by default (emulator_speed.py and bench.py
used to write over benchmarks/results/), refuse an existing file without --force before any
work, and say in their docstring where they write. Only argument parsing runs here: no GPU."""

import ast
import importlib.util
import subprocess

import pytest

from .conftest import ROOT

SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py")) + [ROOT / "bench.py"]
WRITERS = [p for p in SCRIPTS if any(s in p.read_text() for s in ('"w")', "write_text(", "savefig("))]


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_the_writers_are_the_ones_expected():
    names = {p.name for p in WRITERS}
    assert {"bench.py", "emulator_speed.py", "tuned_calls.py", "decode_tokens.py", "host_overhead.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_each_docstring_says_where_the_script_writes(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Writes" in doc, f"{path.name}: the docstring should say where it writes (or 'Writes nothing')"


@pytest.mark.parametrize("path", WRITERS, ids=lambda p: p.name)
def test_by_default_no_script_writes_a_tracked_file(path):
    mod = _load(path)
    args = mod.parse_args([])
    for out in mod.outputs(args):
        rel = out.resolve().relative_to(ROOT)
        assert _git("ls-files", "--error-unmatch", str(rel)).returncode != 0, f"{path.name} writes tracked {rel}"
        assert _git("check-ignore", "-q", str(rel)).returncode == 0, f"{path.name} writes {rel}, not ignored by git"


@pytest.mark.parametrize("path", WRITERS, ids=lambda p: p.name)
def test_an_existing_file_is_refused_without_force(path, tmp_path, capsys):
    mod = _load(path)
    given = ["--out", str(tmp_path / "out.json")]
    outs = mod.outputs(mod.parse_args(given))
    assert outs and all(tmp_path in o.parents for o in outs)
    outs[0].parent.mkdir(parents=True, exist_ok=True)
    outs[0].write_text("earlier results")
    with pytest.raises(SystemExit) as e:
        mod.parse_args(given)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(outs[0]) in err and "--force" in err
    assert outs[0].read_text() == "earlier results"
    assert mod.outputs(mod.parse_args(given + ["--force"])) == outs
