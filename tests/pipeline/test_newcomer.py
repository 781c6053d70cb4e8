"""What a newcomer trips over first: the package's submodules by attribute, and a GPU-sized
shape on the emulator refused up front with a clear reason instead of minutes of work."""

import subprocess
import sys

from click.testing import CliRunner

from hlh_mlx.cli import main


def test_submodules_are_attributes_of_the_package():
    code = "import hlh_mlx; print(hlh_mlx.tuned.softmax, hlh_mlx.nn.RMSNorm.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hlh_mlx.tuned softmax" in out.stdout and "RMSNorm" in out.stdout


def test_a_gpu_sized_shape_on_the_emulator_is_refused_with_the_reason(store_dir):
    r = CliRunner().invoke(main, ["sweep", "matmul", "--shape", "4096x4096x4096", "--backend", "emulator"])
    assert r.exit_code == 2
    assert "4096x4096x4096 moves 192 MB" in r.output and "checks correctness, it times nothing" in r.output
    assert not (store_dir / "emulator" / "matmul.jsonl").exists()


def test_a_template_error_is_one_line_naming_file_and_line_in_every_command(extra_templates):
    from tests.pipeline.conftest import ROOT
    text = (ROOT / "templates" / "softmax" / "rows.metal.j2").read_text()
    path = extra_templates("softmax", "bad.metal.j2", text.replace("[constraints]", '[constraints]\nuses_shape = "R > 0"', 1))
    for args in (["list", "softmax"], ["check", "softmax", "bad", "--sample", "1"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code in (1, 2) and "Traceback" not in r.output, (args, r.output)
        assert f"{path}:" in r.output and "undefined name 'R'" in r.output


def test_the_emulator_shows_what_it_proved_and_refuses_to_rank(store_dir):
    r = CliRunner().invoke(main, ["sweep", "softmax", "--budget", "2"])
    assert r.exit_code == 0, r.output
    assert "shapes checked" in r.output and "worst rel err" in r.output
    assert "chain ms" not in r.output and "e2e vs built-in" not in r.output  # no empty timing columns
    for flag in ("--top", "--retime"):
        args = ["sweep", "softmax", flag] + (["3"] if flag == "--top" else [])
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and f"{flag} needs a GPU" in r.output


def test_long_commands_show_counts_and_an_eta_when_piped(store_dir):
    """A piped sweep printed only 'sweeping'; a 10-minute check had no overall count."""
    r = subprocess.run([sys.executable, "-m", "hlh_mlx", "sweep", "softmax", "--budget", "2"], capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "HLH_MLX_VARIANTS": str(store_dir)})
    assert r.returncode == 0, r.stderr
    assert "sweeping softmax: 0/2" in r.stderr and "sweeping softmax: 2/2 (100%)" in r.stderr and "eta" in r.stderr
    r = CliRunner().invoke(main, ["check", "softmax", "--sample", "1", "--dtype", "float32"])
    assert r.exit_code == 0 and "checking 1 variant x dtype pairs" in r.output and "[1/1, eta 0s] ok" in r.output
