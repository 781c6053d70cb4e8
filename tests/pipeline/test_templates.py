"""Template files: header, rendering, line mapping, and errors that name file and line."""

import pytest

from hlh_mlx import templates, variants
from hlh_mlx.templates import TemplateError

HEAD = """{#
[meta]
op = "matmul"
inputs = ["a", "b"]
outputs = ["c"]
[params]
X = [1, 2]
[launch]
grid = ["N", "M", "1"]
threadgroup = ["8", "8", "1"]
[template_args]
T = "dtype"
#}
"""


def write(tmp_path, text, name="t.metal.j2"):
    p = tmp_path / "matmul" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_render_maps_kernel_lines_to_template_lines(tmp_path):
    body = "uint a0 = 1;\n{% for i in range(X) %}\nfloat v{{ i }} = {{ i }};\n{% endfor %}\nc[0] = 0;\n"
    t = templates.load(write(tmp_path, HEAD + body))
    r = t.render({"X": 2})
    assert r.source.splitlines() == ["uint a0 = 1;", "float v0 = 0;", "float v1 = 1;", "c[0] = 0;"]
    first = HEAD.count("\n") + 1
    assert r.source_lines == (first, first + 2, first + 2, first + 4)


def test_header_block_is_separate_and_ends_with_newline(tmp_path):
    t = templates.load(write(tmp_path, HEAD + "{% set header %}\nfloat f(float x) { return x; }\n{% endset %}\nc[0] = f(1);\n"))
    r = t.render({"X": 1})
    assert r.header == "float f(float x) { return x; }\n"
    assert r.source.strip() == "c[0] = f(1);"


def test_jinja_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, HEAD + "ok;\n{% if X %}\nnever closed\n")
    with pytest.raises(TemplateError) as e:
        templates.load(p)
    assert e.value.path == str(p) and e.value.line is not None and "syntax" in str(e.value)


def test_bad_toml_names_the_line(tmp_path):
    p = write(tmp_path, HEAD.replace('X = [1, 2]', 'X = [1, 2') + "c[0] = 0;\n")
    with pytest.raises(TemplateError) as e:
        templates.load(p)
    assert e.value.line in (7, 8) and "TOML" in str(e.value)  # the unclosed line, or where the parser noticed


def test_undefined_name_in_expression_names_its_line(tmp_path):
    p = write(tmp_path, HEAD.replace('grid = ["N", "M", "1"]', 'grid = ["N", "Q * 2", "1"]') + "c[0] = 0;\n")
    v = variants.expand(templates.load(p))[0]
    with pytest.raises(TemplateError) as e:
        v.grid({"M": 4, "N": 4, "K": 4}, "float32")
    assert e.value.line == 9 and "Q" in str(e.value)


def test_expressions_cannot_reach_python(tmp_path):
    p = write(tmp_path, HEAD.replace('grid = ["N", "M", "1"]', 'grid = ["N.__class__.__mro__", "M", "1"]') + "c[0] = 0;\n")
    v = variants.expand(templates.load(p))[0]
    with pytest.raises(TemplateError):
        v.grid({"M": 4, "N": 4, "K": 4}, "float32")


def test_missing_header_and_wrong_folder_are_reported(tmp_path):
    with pytest.raises(TemplateError, match="missing the leading"):
        templates.load(write(tmp_path, "c[0] = 0;\n"))
    p = tmp_path / "softmax" / "x.metal.j2"
    p.parent.mkdir()
    p.write_text(HEAD + "c[0] = 0;\n")
    with pytest.raises(TemplateError, match="op = 'matmul' but the file is in templates/softmax"):
        templates.load(p)


def test_every_shipped_template_loads_and_renders():
    found = templates.discover()
    assert {t.name for t in found} >= {"naive.metal", "tiled.metal", "regblock.metal", "simdgroup.metal",
                                       "tiled.cuda", "regblock.cuda", "wmma.cuda"}
    for t in found:
        vs = variants.expand(t)
        assert vs, t.path
        assert vs[0].rendered.source.strip()
