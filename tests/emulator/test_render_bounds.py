"""Template rendering is bounded: a template from outside cannot hang a sweep or fill memory."""

import time

import pytest

from hlh_mlx import templates
from hlh_mlx.templates import TemplateError

HEAD = """{#
[meta]
op = "gelu"
inputs = ["inp"]
outputs = ["out"]
[params]
X = [1]
[launch]
grid = ["1", "1", "1"]
threadgroup = ["1", "1", "1"]
#}
uint i = thread_position_in_grid.x;
"""
BODY_LINE = HEAD.count("\n") + 1


def load(tmp_path, body):
    d = tmp_path / "gelu"
    d.mkdir()
    p = d / "bounded.metal.j2"
    p.write_text(HEAD + body)
    return templates.load(p)


@pytest.mark.parametrize("body,why", [
    ("{% for i in range(10**12) %}x{% endfor %}", "range of 1000000000000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop steps and calls"),
    ("{{ 'a' * 10**10 }}", "size limit"),
    ("{{ 7 ** 100000000 }}", "too large"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion|loop steps and calls"),
], ids=["huge-range", "nested-loops", "string-repeat", "power", "recursion"])
def test_a_runaway_render_is_stopped_with_the_template_file(tmp_path, body, why):
    t = load(tmp_path, body)
    start = time.monotonic()
    with pytest.raises(TemplateError, match=why) as e:
        t.render({"X": 1})
    assert time.monotonic() - start < templates.MAX_RENDER_SECONDS + 5
    assert str(t.path) in str(e.value)


def test_the_line_of_a_stopped_render_is_named(tmp_path):
    t = load(tmp_path, "out[i] = 1;\n{% for i in range(10**12) %}x{% endfor %}\n")
    with pytest.raises(TemplateError) as e:
        t.render({"X": 1})
    # Jinja maps a loop head's code to the template line before it at times
    assert e.value.line in (BODY_LINE, BODY_LINE + 1)


def test_the_render_time_limit_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.2)
    monkeypatch.setattr(templates, "MAX_RENDER_STEPS", 10**9)
    t = load(tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    with pytest.raises(TemplateError, match="longer than 0.2 s"):
        t.render({"X": 1})
    assert time.monotonic() - start < 3


def test_ordinary_loops_still_render(tmp_path):
    r = load(tmp_path, "{% for k in range(4) %}out[{{ k }}] = {{ k * X }};\n{% endfor %}").render({"X": 3})
    assert [ln.strip() for ln in r.source.splitlines()[1:]] == [f"out[{k}] = {3 * k};" for k in range(4)]
