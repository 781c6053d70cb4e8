"""Bad input a newcomer gives (a typo in a template body, a wrong argument, a missing file):
one clear line naming the file, line or parameter, from every command; never a traceback."""

import pytest
from click.testing import CliRunner

from hlh_mlx import templates
from hlh_mlx.cli import main
from hlh_mlx.templates import TemplateError

from .conftest import ROOT

GELU = (ROOT / "templates" / "gelu" / "elementwise.metal.j2").read_text()
BODY = "uint n = x_shape[0];"


def _commands(path):
    return [["list", "gelu"], ["render", "gelu", "bad"], ["render", "gelu", "bad", "--full"],
            ["check", "gelu", "bad", "--sample", "1", "--dtype", "float32"],
            ["sweep", "gelu", "--template", "bad", "--budget", "1"], ["guard", str(path)]]


def _bad_template(extra_templates, replacement, marker):
    assert BODY in GELU
    text = GELU.replace(BODY, replacement, 1)
    path = extra_templates("gelu", "bad.metal.j2", text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if marker in l)
    return path, line


@pytest.mark.parametrize("replacement", [
    "uint n = x_shape[0] + {{ NOPE }};",
    "{% if NOPE > 2 %}\nuint n = x_shape[0];\n{% else %}\nuint n = x_shape[0];\n{% endif %}",
    "{% for i in range(NOPE) %}\n{% endfor %}\n" + BODY,
], ids=["output", "if", "for"])
def test_an_undefined_name_in_the_body_is_named_with_its_line_by_every_command(store_dir, extra_templates,
                                                                               replacement):
    path, line = _bad_template(extra_templates, replacement, "NOPE")
    for args in _commands(path):
        r = CliRunner().invoke(main, args)
        assert r.exit_code in (1, 2), (args, r.output)
        assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), args
        want = f"{path}:{line}: " + ("template: " if args[0] == "guard" else "") + "undefined name 'NOPE'"
        assert want in r.output, (args, r.output)
        assert r.output.count(f"{path}:") == 1, (args, r.output)  # one line, the file named once


def test_a_jinja_syntax_error_in_the_body_is_named_with_its_line_by_every_command(store_dir, extra_templates):
    path, line = _bad_template(extra_templates, "uint n = x_shape[0] + {{ ELEMS + }};", "ELEMS + }}")
    for args in _commands(path):
        r = CliRunner().invoke(main, args)
        assert r.exit_code in (1, 2), (args, r.output)
        assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), args
        assert f"{path}:{line}: " in r.output and "syntax error" in r.output, (args, r.output)
        assert r.output.count(f"{path}:") == 1, (args, r.output)


def test_names_the_body_may_define_or_guard_are_not_reported(tmp_path):
    body = ("{% if ELEMS > 2 %}{% set Y = 1 %}{% else %}{% set Y = 2 %}{% endif %}\n"
            "{% set ns = namespace(k=0) %}{% for i in range(ELEMS) %}{% set ns.k = ns.k + loop.index %}{% endfor %}\n"
            "{% macro m(a) %}{{ a }}{% endmacro %}\n"
            "uint n = x_shape[0] + {{ Y }} + {{ ns.k }} + {{ m(3) }} + {{ OPTIONAL | default(0) }}"
            "{% if MAYBE is defined %} + 1{% endif %};")
    p = tmp_path / "gelu" / "ok.metal.j2"
    p.parent.mkdir()
    p.write_text(GELU.replace(BODY, body, 1))
    t = templates.load(p)
    assert "uint n = x_shape[0] + 1 + 10 + 3 + 0;" in t.render({"ELEMS": 4, "TG": 64}).source


def test_a_name_undefined_at_render_time_is_named_with_its_line(tmp_path):
    """Defined on one branch only: not refused at load, named with its line when missing."""
    text = GELU.replace(BODY, "{% if ELEMS > 2 %}{% set Y = 1 %}{% endif %}\nuint n = x_shape[0] + {{ Y }};", 1)
    p = tmp_path / "gelu" / "half.metal.j2"
    p.parent.mkdir()
    p.write_text(text)
    t = templates.load(p)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "{{ Y }}" in l)
    with pytest.raises(TemplateError) as e:
        t.render({"ELEMS": 1, "TG": 64})
    assert str(e.value).startswith(f"{p}:{line}: undefined name 'Y'")


def _gelu_variant_id():
    from hlh_mlx import variants
    return variants.expand(templates.discover("gelu")[0])[0].id


BAD_ARGS = {  # what a newcomer types: (arguments, words the one-line error must hold)
    "render-dtype": (["render", "matmul", "tiled", "--full", "--dtype", "float64"], ["'float64'", "dtype"]),
    "check-dtype": (["check", "matmul", "tiled", "--dtype", "nope"], ["unsupported dtype 'nope'"]),
    "check-sample-negative": (["check", "matmul", "--sample", "-1"], ["--sample"]),
    "check-sample-zero": (["check", "matmul", "--sample", "0"], ["--sample"]),
    "sweep-budget-zero": (["sweep", "gelu", "--budget", "0"], ["--budget"]),
    "sweep-top-zero": (["sweep", "gelu", "--top", "0"], ["--top"]),
    "sweep-timeout-negative": (["sweep", "gelu", "--budget", "1", "--timeout", "-1"], ["--timeout"]),
    "check-cuda-template-here": (["check", "matmul", "tiled.cuda", "--backend", "emulator"],
                                 ["tiled.cuda", "--backend cuda"]),
    "sweep-cuda-template-here": (["sweep", "matmul", "--template", "tiled.cuda", "--backend", "emulator"],
                                 ["tiled.cuda", "--backend cuda"]),
    "guard-not-a-kernel": (["guard", str(ROOT / "README.md")], ["README.md", ".j2", ".py"]),
    "export-missing-folder": (["export", "gelu", "--variant", "ID", "-o", "/nonexistent-hlh/dir/k.py"],
                              ["/nonexistent-hlh/dir/k.py"]),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_a_bad_argument_is_one_clear_line_not_a_traceback(store_dir, name):
    args, words = BAD_ARGS[name]
    args = [_gelu_variant_id() if a == "ID" else a for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code in (1, 2), (args, r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, (args, r.output)
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and all(w in error[0] for w in words), (args, r.output)
    assert not (store_dir / "emulator").exists()  # refused before any work


@pytest.mark.parametrize("name,value", [("HLH_MLX_EMU_TIMEOUT", "abc"), ("HLH_MLX_EMU_THREADS", "four")])
def test_a_bad_setting_is_named_before_any_work(store_dir, name, value):
    """It failed every variant with "could not convert string to float: 'abc'", naming nothing."""
    r = CliRunner().invoke(main, ["check", "gelu", "--sample", "1", "--dtype", "float32"], env={name: value})
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"{name}={value!r}" in error[0] and "checking" not in r.output, r.output
