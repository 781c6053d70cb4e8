"""A sanitizer finding in a kernel that came from a template names the template file and
line, through guard (which runs kernels only inside the emulator's sandbox)."""

from pathlib import Path

from hlh_mlx import guard

RACY = """{#
[meta]
op = "gelu"
inputs = ["x"]
outputs = ["y"]
summary = "planted race: each thread reads its right neighbour's slot with no barrier"
[params]
TG = [64]
[launch]
grid = ["ceil_div(N, TG) * TG", "1", "1"]
threadgroup = ["TG", "1", "1"]
[template_args]
T = "dtype"
#}
threadgroup float buf[{{ TG }}];
uint t = thread_index_in_threadgroup;
uint i = thread_position_in_grid.x;
uint n = x_shape[0];
buf[t] = i < n ? float(x[i]) : 0.0f;
float right = buf[(t + 1) % {{ TG }}];
if (i < n) {
    float v = float(x[i]) + 0.0f * right;
    y[i] = T(0.5f * v * (1.0f + tanh(0.7978845608f * (v + 0.044715f * v * v * v))));
}
"""
# thread 0 reads slot 1 before thread 1 writes it: the finding is at the write that
# completes the race, and names both threads
RACY_LINE = RACY.splitlines().index("buf[t] = i < n ? float(x[i]) : 0.0f;") + 1


def test_a_race_in_a_template_is_reported_at_the_template_line(tmp_path):
    d = tmp_path / "gelu"
    d.mkdir()
    path = d / "racy.metal.j2"
    path.write_text(RACY)
    findings = guard.scan([path])
    races = [f for f in findings if "race" in f.message]
    assert races, [str(f) for f in findings]
    assert f"{path}:{RACY_LINE}: race" in races[0].message
    assert "kernel source line 5" in races[0].message
    assert "thread (1, 0, 0); thread (0, 0, 0)" in races[0].message
