"""Names a template puts into a kernel's C++ must be C identifiers: refused at load, with file and line."""

import pytest

from hlh_mlx import templates

HEAD = """{#
[meta]
op = "gelu"
inputs = [%s]
outputs = [%s]
[params]
X = [1]
%s
[launch]
grid = ["1", "1", "1"]
threadgroup = ["1", "1", "1"]
[template_args]
T = "dtype"
%s
#}
out[0] = 1;
"""


@pytest.mark.parametrize("inputs,outputs,param,targ,line", [
    ('"inp /*"', '"out"', "", "", 4),
    ('"inp"', '"out\\nfile /etc/passwd"', "", "", 5),
    ('"inp"', '"out"', '"A B" = [1]', "", 8),
    ('"inp"', '"out"', "", '"T> struct" = "dtype"', 14),
], ids=["input", "output", "param", "template-arg"])
def test_a_name_that_is_not_a_c_identifier_is_refused_at_load(tmp_path, inputs, outputs, param, targ, line):
    d = tmp_path / "gelu"
    d.mkdir()
    p = d / "names.metal.j2"
    p.write_text(HEAD % (inputs, outputs, param, targ))
    with pytest.raises(templates.TemplateError, match="not a C identifier") as e:
        templates.load(p)
    assert str(p) in str(e.value) and e.value.line == line


def test_identifier_names_load(tmp_path):
    d = tmp_path / "gelu"
    d.mkdir()
    p = d / "names.metal.j2"
    p.write_text(HEAD % ('"inp"', '"out_2"', "_Y = [2]", "U = \"dtype\""))
    t = templates.load(p)
    assert t.inputs == ["inp"] and set(t.params) == {"X", "_Y"}
