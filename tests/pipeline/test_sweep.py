"""The sweep end to end on the emulator: results, resume, interruption, isolation, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from hlh_mlx import store
from hlh_mlx.cli import main

from .conftest import ROOT, copy_template


def cli(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def lines(store_dir):
    p = store_dir / "emulator" / "matmul.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_sweep_checks_variants_and_prints_ranked_table_with_builtin(store_dir):
    r = cli("sweep", "matmul", "--budget", "8")
    assert r.exit_code == 0, r.output
    recs = lines(store_dir)
    assert len(recs) == 8 and all(x["correct"] for x in recs)
    assert {x["family"] for x in recs} == {"naive", "tiled", "regblock", "simdgroup"}
    assert "mlx built-in" in r.output and "the emulator has no speed" in r.output
    for x in recs:
        assert x["device"] == "emulator" and x["mlx"] and x["source_hash"] and x["checks"]
        assert {c["shape"]["M"] for c in x["checks"]} >= {33, 1}  # edge shapes were checked
    # a rerun resumes: nothing is run twice
    r = cli("sweep", "matmul", "--budget", "8")
    assert r.exit_code == 0 and len(lines(store_dir)) == 8


def test_corrupt_results_line_is_reported_and_skipped(store_dir):
    path = store_dir / "emulator" / "matmul.jsonl"
    store.append(path, {"op": "matmul", "device": "emulator", "backend": "emulator", "variant_id": None,
                        "template": "builtin", "shape": {"M": 1, "N": 1, "K": 1}, "shape_str": "1x1x1",
                        "dtype": "float32"})
    with open(path, "a") as f:
        f.write('{"half a line\n')
    with pytest.warns(RuntimeWarning, match=r"matmul.jsonl:2: skipping a corrupt results line"):
        assert len(store.read(path)) == 1


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from hlh_mlx.worker import handle
    for line in sys.stdin:
        req = json.loads(line)
        bs = req.get("params", {}).get("BS")
        if bs == 16:
            os._exit(9)          # the process dies, as a GPU fault would take it
        if bs == 32:
            time.sleep(3600)     # hangs
        sys.stdout.write(json.dumps(handle(req)) + "\\n")
        sys.stdout.flush()
""")


def test_a_crashing_and_a_hanging_variant_are_recorded_and_the_sweep_goes_on(store_dir, tmp_path):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    env = {"HLH_MLX_WORKER": f"{sys.executable} {fake}", "PYTHONPATH": str(ROOT)}
    r = cli("sweep", "matmul", "--template", "tiled", "--timeout", "20", env=env)
    assert r.exit_code == 0, r.output
    by_bs = {}
    for x in lines(store_dir):
        by_bs.setdefault(x["params"]["BS"], set()).add(x["status"])
    assert by_bs[16] == {"crashed"} and by_bs[32] == {"timeout"} and by_bs[8] == {"ok"}


SLOW_WORKER = textwrap.dedent("""
    import json, sys, time
    from hlh_mlx.worker import handle
    for line in sys.stdin:
        time.sleep(1.0)          # slow enough that the interrupt lands mid-sweep
        sys.stdout.write(json.dumps(handle(json.loads(line))) + "\\n")
        sys.stdout.flush()
""")


def test_interrupted_sweep_keeps_what_finished_and_resumes(store_dir, tmp_path):
    slow = tmp_path / "slow_worker.py"
    slow.write_text(SLOW_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HLH_MLX_WORKER=f"{sys.executable} {slow}")
    cmd = [sys.executable, "-m", "hlh_mlx", "sweep", "matmul", "--template", "regblock", "--budget", "6"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(lines(store_dir)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    before = lines(store_dir)
    assert 2 <= len(before) < 6
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = lines(store_dir)
    assert len(after) == 6 and after[:len(before)] == before   # nothing redone, nothing lost


@pytest.mark.parametrize("args,message", [
    (["sweep", "softmaxx"], "unknown op 'softmaxx'"),
    (["sweep", "matmul", "--template", "nope"], "unknown template 'nope'"),
    (["sweep", "matmul", "--shape", "12x12"], "needs 3 sizes"),
    (["sweep", "matmul", "--shape", "M=1,N=2"], "must give M, N, K"),
    (["sweep", "matmul", "--dtype", "int8"], "unsupported dtype 'int8'"),
    (["render", "matmul", "tiled", "-p", "BQ=4"], "unknown parameter 'BQ'"),
    (["render", "matmul", "tiled", "-p", "BS=12"], "BS=12 is outside the space"),
    (["check", "matmul", "tiled", "--backend", "cuda"], "backend 'cuda' needs"),
])
def test_bad_input_gets_a_one_line_error(args, message, store_dir):
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_template_syntax_error_names_file_and_line(store_dir, extra_templates):
    p = extra_templates("matmul", "broken.metal.j2", copy_template("tiled.metal.j2").replace(
        "{{ BS }}][{{ BS }}]", "{{ BS }][{{ BS }}]", 1))
    r = CliRunner().invoke(main, ["sweep", "matmul"])
    assert r.exit_code != 0 and f"{p}:" in r.output and "syntax" in r.output


def test_space_with_no_valid_variant_is_an_error(store_dir, extra_templates):
    extra_templates("matmul", "empty.metal.j2", copy_template("tiled.metal.j2").replace(
        "[launch]", '[constraints]\nnever = "BS > 100"\n\n[launch]'))
    r = CliRunner().invoke(main, ["check", "matmul", "empty"])
    assert r.exit_code != 0 and "no valid variant" in r.output


def test_kernel_compile_error_maps_to_the_template_line(store_dir, extra_templates):
    text = copy_template("tiled.metal.j2").replace("float acc = 0.0f;", "float acc = 0.0f + undefined_thing;")
    p = extra_templates("matmul", "typo.metal.j2", text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "undefined_thing" in l)
    r = CliRunner().invoke(main, ["check", "matmul", "typo", "-p", "BS=8", "-p", "PAD=0", "--dtype", "float32"])
    assert r.exit_code == 1
    assert f"{p}:{line}:" in r.output and "undefined_thing" in r.output


def test_check_catches_a_kernel_that_skips_outputs(store_dir, extra_templates):
    text = copy_template("naive.metal.j2").replace("if (row >= M || col >= N) return;",
                                                   "if (row >= M || col >= N || col % 7 == 3) return;")
    extra_templates("matmul", "lazy.metal.j2", text)
    r = CliRunner().invoke(main, ["check", "matmul", "lazy", "-p", "TX=8", "-p", "TY=1", "--dtype", "float32"])
    assert r.exit_code == 1 and "NaN/inf (unwritten?)" in r.output


def test_check_passes_a_sample_of_every_metal_template(store_dir):
    r = CliRunner().invoke(main, ["check", "matmul", "--sample", "1", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert "4 passed, 0 failed" in r.output


def test_list_shows_templates_and_space_sizes():
    r = cli("list")
    assert r.exit_code == 0 and "simdgroup.metal" in r.output and "valid of" in r.output


def test_bench_writes_markdown_and_json(store_dir, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--budget", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "bench-emulator.json").read_text())
    rows = {r["op"]: r for r in data["rows"]}
    from hlh_mlx import ops
    assert set(rows) == set(ops.names()) and all(r["correct_variants"] == 1 for r in rows.values())
    assert "no speed" in (out / "bench-emulator.md").read_text()


def test_wheel_ships_templates_results_and_emulator_runtime(tmp_path):
    import zipfile
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT),
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "hlh_mlx/_templates/matmul/simdgroup.metal.j2" in names
    assert "hlh_mlx/emulator/runtime/runtime.cpp" in names
    assert any(n.startswith("hlh_mlx/_variants/") and n.endswith("matmul.jsonl") for n in names)


class ScriptedGPU:
    """Stands in for the timing worker of a GPU run: answers with given times, records asks."""

    def __init__(self, builtin_ms, variant_ms):
        self.builtin_ms, self.variant_ms, self.asked = builtin_ms, variant_ms, []

    def request(self, job, timeout):
        self.asked.append(("builtin" if job["kind"] == "builtin" else job["params"]["BS"], bool(job.get("repeat"))))
        ms = self.builtin_ms if job["kind"] == "builtin" else self.variant_ms[job["params"]["BS"]]
        return {"status": "ok", "timing": {"median_ms": ms}, "checks": []}

    def stop(self):
        pass


def test_every_run_that_times_variants_times_the_builtin_again(store_dir):
    """New variants are ranked against a built-in timed in the same run (a resumed sweep
    may run on another lent machine); a run with nothing new times nothing."""
    import dataclasses

    from hlh_mlx import backends, rank, sweep
    base = sweep.plan("matmul", backend="emulator", template="tiled", shapes=[{"M": 64, "N": 64, "K": 64}],
                      dtypes=["float32"])
    gpu = backends.Device("scripted-gpu", "Scripted GPU", "none", "cuda")
    by_bs = {v.param_dict["BS"]: v for v in base.space if v.param_dict.get("PAD", 0) == 0}
    first = dataclasses.replace(base, device=gpu, candidates=[by_bs[8]], budget=None)
    w = ScriptedGPU(1.0, {8: 0.9, 16: 0.5})
    sweep.run(first, worker=w)
    assert w.asked == [("builtin", False), (8, False), ("builtin", True), (8, True)]
    w.asked.clear()
    sweep.run(first, worker=w)
    assert w.asked == []  # a rerun resumes: nothing new, nothing timed
    w.builtin_ms = 0.6  # the next run's machine is faster
    sweep.run(dataclasses.replace(first, candidates=[by_bs[8], by_bs[16]]), worker=w)
    assert w.asked == [("builtin", False), (16, False), ("builtin", True), (16, True)]
    records = store.read(store_dir / "scripted-gpu" / "matmul.jsonl")
    rows = rank.table_rows(records, "matmul", {"M": 64, "N": 64, "K": 64}, "float32", "emulator")
    base_row = next(r for r in rows if r["variant"] == "mlx built-in")
    assert base_row["median_ms"] == 0.6  # ranked against this run's built-in, not the first run's
    w.asked.clear()
    sweep.run(dataclasses.replace(first, retime=True), worker=w)  # --retime: built-in and winner, twice each
    assert w.asked == [("builtin", False), (16, False), ("builtin", True), (16, True)]


def test_a_new_timing_method_times_the_old_methods_winner_again(store_dir, monkeypatch):
    """Selection compares a shape's newest timing method alone: a sweep under a new method
    whose sample leaves out the old method's winner would hide it (a fresh tune's sample
    shadowed the H200's 4-bit gemv winner at 4096x14336 this way). Each run times the stored
    winners first; ones already timed by this method are not timed again."""
    import dataclasses

    from hlh_mlx import backends, sweep, timing
    base = sweep.plan("matmul", backend="emulator", template="tiled", shapes=[{"M": 64, "N": 64, "K": 64}],
                      dtypes=["float32"])
    gpu = backends.Device("scripted-gpu", "Scripted GPU", "none", "cuda")
    by_bs = {v.param_dict["BS"]: v for v in base.space if v.param_dict.get("PAD", 0) == 0}
    old = dataclasses.replace(base, device=gpu, candidates=[by_bs[8], by_bs[16]], budget=None)
    w = ScriptedGPU(1.0, {8: 0.9, 16: 0.5})
    with monkeypatch.context() as m:
        m.setattr(timing, "METHOD", timing.METHOD - 1)
        sweep.run(old, worker=w)
    w.asked.clear()
    sweep.run(dataclasses.replace(old, candidates=[by_bs[8]]), worker=w)  # a sample without the winner
    assert [a for a in w.asked if not a[1]] == [("builtin", False), (16, False), (8, False)]
    w.asked.clear()
    sweep.run(dataclasses.replace(old, candidates=[by_bs[8]]), worker=w)
    assert w.asked == []  # timed by this method already: a rerun resumes


class CompilingGPU(ScriptedGPU):
    """A GPU whose built-in compiles on its first call for longer than the limit a variant
    gets: a built-in timing under that limit times out. The limits it was given are recorded."""

    def __init__(self, *a, compile_s=100, never=False):
        super().__init__(*a)
        self.limits, self.compile_s, self.never, self.warm = [], compile_s, never, False

    def _builtin_answers(self, job, timeout):
        return not self.never and (timeout >= self.compile_s or (job.get("repeat") and self.warm))

    def request(self, job, timeout):
        self.limits.append(("builtin" if job["kind"] == "builtin" else "variant", bool(job.get("repeat")), timeout))
        if job["kind"] == "builtin":
            if not self._builtin_answers(job, timeout):
                self.asked.append(("builtin", bool(job.get("repeat"))))
                return {"status": "timeout", "error": f"no answer in {timeout} s", "checks": []}
            self.warm = True  # built once in this process: a second timing needs no room
        return super().request(job, timeout)


def test_the_builtin_gets_room_to_compile_and_variants_it_failed_are_timed_again(store_dir, monkeypatch):
    """MLX's CUDA quantized matmul for several rows compiled for longer than the 60 s a
    device sweep gave each job: its timing timed out, the shape's variants had no built-in of
    their run to be ranked against, and selection never served them (H100, 2026-12-05)."""
    import dataclasses

    from hlh_mlx import backends, rank, sweep
    shape = {"M": 64, "N": 64, "K": 64}
    base = sweep.plan("matmul", backend="emulator", template="tiled", shapes=[shape], dtypes=["float32"], timeout=60)
    gpu = backends.Device("scripted-gpu", "Scripted GPU", "none", "cuda")
    by_bs = {v.param_dict["BS"]: v for v in base.space if v.param_dict.get("PAD", 0) == 0}
    plan = dataclasses.replace(base, device=gpu, candidates=[by_bs[8]], budget=None)
    # a run of before: the built-in had the variants' limit and timed out
    with monkeypatch.context() as m:
        m.setattr(sweep, "BUILTIN_TIMEOUT", 0)
        sweep.run(plan, worker=CompilingGPU(1.0, {8: 0.52}))
    rows = rank.table_rows(store.read(store_dir / "scripted-gpu" / "matmul.jsonl"), "matmul", shape, "float32",
                           "emulator")
    assert next(r for r in rows if r["variant"] != "mlx built-in")["speedup"] is None  # nothing to rank against
    w = CompilingGPU(1.0, {8: 0.5})
    sweep.run(plan, worker=w)  # nothing new in the plan, but the variant the failed built-in left unranked
    assert [a for a in w.asked if not a[1]] == [("builtin", False), (8, False)]
    assert all(t == sweep.BUILTIN_TIMEOUT for kind, again, t in w.limits if kind == "builtin" and not again)
    assert all(t == 60 for kind, again, t in w.limits if kind == "variant" or again)
    rows = rank.table_rows(store.read(store_dir / "scripted-gpu" / "matmul.jsonl"), "matmul", shape, "float32",
                           "emulator")
    assert next(r for r in rows if r["variant"] != "mlx built-in")["speedup"] == pytest.approx(2.0)
    w = CompilingGPU(1.0, {8: 0.5})
    sweep.run(plan, worker=w)
    assert w.asked == []  # ranked now: a rerun resumes
    # a --retime whose built-in fails leaves the variant's newest timing unranked: the next
    # plain run times it again (selection ranks the newest timing alone)
    with monkeypatch.context() as m:
        m.setattr(sweep, "BUILTIN_TIMEOUT", 0)
        sweep.run(dataclasses.replace(plan, retime=True), worker=CompilingGPU(1.0, {8: 0.51}))
    w = CompilingGPU(1.0, {8: 0.49})
    sweep.run(plan, worker=w)
    assert [a for a in w.asked if not a[1]] == [("builtin", False), (8, False)]


def test_variants_are_not_timed_again_for_a_builtin_that_never_answers(store_dir):
    import dataclasses

    from hlh_mlx import backends, sweep
    shape = {"M": 64, "N": 64, "K": 64}
    base = sweep.plan("matmul", backend="emulator", template="tiled", shapes=[shape], dtypes=["float32"], timeout=60)
    gpu = backends.Device("scripted-gpu", "Scripted GPU", "none", "cuda")
    by_bs = {v.param_dict["BS"]: v for v in base.space if v.param_dict.get("PAD", 0) == 0}
    plan = dataclasses.replace(base, device=gpu, candidates=[by_bs[8]], budget=None)
    asked = []
    for ms in (0.5, 0.51, 0.52, 0.53):
        w = CompilingGPU(1.0, {8: ms}, never=True)
        sweep.run(plan, worker=w)
        asked.append([a for a in w.asked if not a[1]])
    assert asked[0] == [("builtin", False), (8, False)] and asked[1] == [("builtin", False), (8, False)]
    assert asked[2:] == [[], []]  # the built-in failed store.MAX_HANG_ATTEMPTS times: nothing more to rank against


class LoggingWorker:
    """Answers every variant as correct; remembers the parameters asked, per shape."""

    def __init__(self):
        self.asked = []

    def request(self, job, timeout):
        self.asked.append((json.dumps(job["time_shape"], sort_keys=True), job.get("params")))
        return {"status": "ok", "error": None, "checks": []}

    def stop(self):
        pass


def test_every_shape_starts_with_variants_that_run_at_it(store_dir, extra_templates):
    """A seeded first sample that none of one shape's valid variants are in (a requirement
    on the shape rules them out there) is topped up for that shape, never left empty:
    `hlh_mlx tune` once swept no variant at all at Llama's o projection this way."""
    from hlh_mlx import sweep
    text = copy_template("rows.metal.j2", op="rms_norm").replace(
        "[launch]", '[requires]\nlong_rows = "C >= 1024 or NR == 1"\n\n[launch]')
    extra_templates("rms_norm", "req.metal.j2", text)
    short, long = {"R": 8, "C": 512}, {"R": 8, "C": 2048}
    kw = dict(backend="emulator", template="req", shapes=[long, short], dtypes=["float32"], budget=4)
    seed = next(s for s in range(200) if not any(v.param_dict["NR"] == 1
                                                 for v in sweep.plan("rms_norm", seed=s, **kw).candidates))
    p = sweep.plan("rms_norm", seed=seed, **kw)
    assert [v.supports(short, "float32") for v in p.candidates] == [False] * 4
    w = LoggingWorker()
    sweep.run(p, worker=w)
    at = {}
    for shape, params in w.asked:
        at.setdefault(json.loads(shape)["C"], []).append(params)
    assert len(at[2048]) == 4 and len(at[512]) == 4           # the budget at each shape
    assert all(params["NR"] == 1 for params in at[512])        # all of them valid there
    assert at[2048] == [v.param_dict for v in p.candidates]    # the shape they fit ran them as sampled
