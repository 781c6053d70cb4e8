"""Sweeps and checks in several workers at once (--workers N, --ray): the same verdicts and
records as a serial run, a killed worker costs only its variant, GPU workers own one GPU
each and rank against their own GPU's built-in, Ray runs the same jobs."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from hlh_mlx import backends, pool as pool_mod, rank, store, sweep
from hlh_mlx.cli import main

from .conftest import ROOT

# a tiled matmul with a bug per variant: BS=8,PAD=0 is right, BS=8,PAD=1 races (no barrier
# before the next tile is loaded), BS=16 does not compile, BS=32 leaves outputs unwritten.
# (matmul, not gelu: its normwise checks over many elements never flake)
BUGGY = (ROOT / "templates" / "matmul" / "tiled.metal.j2").read_text().replace(
    "        acc += float(As[ty][k]) * float(Bs[k][tx]);\n    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);",
    "        acc += float(As[ty][k]) * float(Bs[k][tx]);\n    }\n"
    "    {% if PAD == 0 or BS != 8 %}threadgroup_barrier(mem_flags::mem_threadgroup);{% endif %}").replace(
    "float acc = 0.0f;", "float acc = 0.0f{% if BS == 16 %} + undefined_thing{% endif %};").replace(
    "if (row < M && col < N) {", "if (row < M && col < N{% if BS == 32 %} && col % 7 != 3{% endif %}) {")
assert BUGGY.count("{% if") == 3


def cli(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def same_fault(text):
    """A fault report without what differs between two runs of one kernel: which of the
    racing threads the sanitizer saw first (threadgroups run in parallel)."""
    return re.sub(r"\(offset \d+\)|thread \(\d+, \d+, \d+\)", "", text) if isinstance(text, str) else text


def comparable(rec: dict) -> dict:
    """A record without what differs between any two runs (date, seed, measured errors)."""
    out = {k: v for k, v in rec.items() if k not in ("date", "seed", "timing", "checks", "schema")}
    out["error"] = same_fault(out.get("error"))
    out["checks"] = [{k: same_fault(c.get(k)) for k in ("ok", "shape", "dtype", "error")} for c in rec.get("checks") or []]
    return out


def records(store_dir, op="matmul"):
    p = store_dir / "emulator" / f"{op}.jsonl"
    return sorted((comparable(r) for r in store.read(p)), key=lambda r: json.dumps(r, sort_keys=True))


def verdicts(output: str) -> list[str]:
    """check's verdict lines without counters, worker names and order."""
    out = []
    for line in output.splitlines():
        if line.startswith("[") and "] " in line:
            out.append(line.split("] ", 1)[1])
        elif line.startswith("     "):
            out[-1] += " | " + same_fault(line.strip())
    return sorted(out)


@pytest.fixture
def buggy(extra_templates):
    extra_templates("matmul", "buggy.metal.j2", BUGGY)


SWEEP = ["sweep", "matmul", "--template", "buggy"]
# one input seed: each job draws the same inputs however it runs (serial, workers, Ray), so
# its error and the seed that replays it are the same text
CHECK = ["check", "matmul", "buggy", "--dtype", "float32", "--input-seed", "1234"]
STATUSES = {"ok", "incorrect", "compile_error", "error"}


def test_sweep_with_two_workers_stores_what_a_serial_sweep_stores(tmp_path, monkeypatch, buggy):
    stores = {}
    for mode in ("serial", "workers"):
        d = tmp_path / mode
        monkeypatch.setenv("HLH_MLX_VARIANTS", str(d))
        r = cli(*SWEEP, *(["--workers", "2"] if mode == "workers" else []))
        assert r.exit_code == 0, r.output
        stores[mode] = records(d)
        if mode == "workers":
            assert "2 worker processes" in r.output and "w0: " in r.output and "w1: " in r.output
    assert stores["serial"] == stores["workers"]
    assert {r["status"] for r in stores["serial"]} == STATUSES and len(stores["serial"]) == 6
    assert any("race" in (r["error"] or "") for r in stores["serial"])


def test_check_with_two_workers_gives_the_serial_verdicts(store_dir, buggy):
    serial = cli(*CHECK)
    parallel = cli(*CHECK, "--workers", "2")
    assert serial.exit_code == parallel.exit_code == 1
    assert verdicts(serial.output) == verdicts(parallel.output) and len(verdicts(serial.output)) == 6
    assert "1 passed, 5 failed" in serial.output and "1 passed, 5 failed" in parallel.output
    assert "with 2 workers" in parallel.output


# answers at once; the variant BS=16,PAD=0 waits to be killed (it writes its pid for the test)
KILLABLE = textwrap.dedent("""
    import json, os, sys, time
    log, pidfile = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        req = json.loads(line)
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "params": req.get("params")}) + "\\n")
        if req.get("params") == {"BS": 16, "PAD": 0} and not os.path.exists(pidfile):
            with open(pidfile, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        time.sleep(0.2)
        sys.stdout.write(json.dumps({"status": "ok", "checks": []}) + "\\n")
        sys.stdout.flush()
""")


def test_a_worker_killed_mid_run_loses_only_its_variant_which_runs_again(store_dir, tmp_path):
    w, log, pidfile = tmp_path / "worker.py", tmp_path / "log", tmp_path / "pid"
    w.write_text(KILLABLE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HLH_MLX_WORKER=f"{sys.executable} {w} {log} {pidfile}")
    proc = subprocess.Popen([sys.executable, "-m", "hlh_mlx", "sweep", "matmul", "--template", "tiled",
                             "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    asked = [json.loads(x) for x in log.read_text().splitlines()]
    target = (16, 0)
    runs = {}
    for a in asked:
        runs.setdefault((a["params"]["BS"], a["params"]["PAD"]), []).append(a["pid"])
    assert len(runs) == 6 and len(runs[target]) == 2 and all(len(p) == 1 for v, p in runs.items() if v != target)
    killed = int(pidfile.read_text())
    served = {}
    for a in asked:
        served.setdefault(a["pid"], []).append((a["params"]["BS"], a["params"]["PAD"]))
    assert served[killed][-1] == target and len(served) <= 3  # the killed one was replaced once at most
    assert any(len(vs) > 1 for pid, vs in served.items() if pid != killed)  # the other went on
    by_variant = {}
    for r in store.read(store_dir / "emulator" / "matmul.jsonl"):
        by_variant.setdefault((r["params"]["BS"], r["params"]["PAD"]), []).append(r["status"])
    assert by_variant[target] == ["crashed", "ok"]
    assert len(by_variant) == 6 and all(s == ["ok"] for v, s in by_variant.items() if v != target)


# ---- GPU workers (no GPU here: a fake device count and scripted timings) ---------------------

def test_gpu_workers_get_distinct_devices():
    assert pool_mod.gpu_pins(4, 8) == ["0", "1", "2", "3"]
    assert pool_mod.gpu_pins(3, 3, visible="5,2,7") == ["5", "2", "7"]
    assert pool_mod.gpu_pins(2, 2, visible="GPU-aa,GPU-bb") == ["GPU-aa", "GPU-bb"]
    with pytest.raises(pool_mod.PoolError, match="--workers 3 needs 3 GPUs, 2 visible"):
        pool_mod.gpu_pins(3, 2)
    with pytest.raises(pool_mod.PoolError, match="names a GPU twice"):
        pool_mod.gpu_pins(2, 2, visible="1,1")
    made = []
    p = pool_mod.local(4, "cuda", count=4, visible="", worker_factory=lambda env: made.append(env) or Scripted())
    assert [e["CUDA_VISIBLE_DEVICES"] for e in made] == ["0", "1", "2", "3"]
    assert len({lane.timed_on for lane in p.lanes}) == 4
    with pytest.raises(pool_mod.PoolError, match="needs 5 GPUs, 4 visible"):
        pool_mod.local(5, "cuda", count=4, visible="", worker_factory=lambda env: Scripted())
    with pytest.raises(pool_mod.PoolError, match="a Mac has one GPU"):
        pool_mod.local(2, "metal", worker_factory=lambda env: Scripted())
    # the emulator shares the cores out instead
    made.clear()
    pool_mod.local(2, "emulator", worker_factory=lambda env: made.append(env) or Scripted())
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in made)


class Scripted:
    """A timing worker on one GPU: built-in and variant times of that GPU; records asks."""

    def __init__(self, builtin_ms=1.0, scale=1.0, device="scripted-gpu"):
        self.builtin_ms, self.scale, self.device, self.asked = builtin_ms, scale, device, []

    def request(self, job, timeout):
        what = "builtin" if job["kind"] == "builtin" else job["params"]["BS"]
        self.asked.append((what, bool(job.get("repeat"))))
        time.sleep(0.01)
        ms = self.builtin_ms if what == "builtin" else self.scale * {8: 0.9, 16: 0.5, 32: 0.7}[what]
        return {"status": "ok", "timing": {"median_ms": ms}, "checks": [], "device": self.device}

    def stop(self):
        pass


def _gpu_plan():
    import dataclasses
    base = sweep.plan("matmul", backend="emulator", template="tiled", shapes=[{"M": 64, "N": 64, "K": 64}],
                      dtypes=["float32"])
    gpu = backends.Device("scripted-gpu", "Scripted GPU", "none", "cuda")
    return dataclasses.replace(base, device=gpu, candidates=[v for v in base.space if v.param_dict["PAD"] == 0],
                               budget=None)


def test_each_gpu_times_the_builtin_and_its_variants_rank_against_it(store_dir):
    p = _gpu_plan()
    fast, slow = Scripted(builtin_ms=0.5, scale=0.5), Scripted(builtin_ms=1.0)
    pool = pool_mod.local(2, "cuda", count=2, visible="", workers=[fast, slow])
    sweep.run(p, pool=pool)
    for w in (fast, slow):
        firsts = [a for a in w.asked if not a[1]]
        assert firsts[0] == ("builtin", False), w.asked   # its own built-in before its first variant
    recs = store.read(store_dir / "scripted-gpu" / "matmul.jsonl")
    assert {r["timed_on"] for r in recs} == {lane.timed_on for lane in pool.lanes}
    assert sorted(r["params"]["BS"] for r in recs if r["template"] != "builtin" and not r.get("repeat")) == [8, 16, 32]
    rows = rank.table_rows(recs, "matmul", p.shapes[0], "float32", p.backend)
    # each variant against the built-in of its own GPU: the same ratio on either GPU
    speedups = {r["params"]: round(r["speedup"], 6) for r in rows if r["variant"] != "mlx built-in"}
    assert speedups == {"BS=8,PAD=0": round(1 / 0.9, 6), "BS=16,PAD=0": 2.0, "BS=32,PAD=0": round(1 / 0.7, 6)}


def test_a_worker_on_another_kind_of_gpu_is_refused(store_dir):
    p = _gpu_plan()
    pool = pool_mod.local(2, "cuda", count=2, visible="", workers=[Scripted(), Scripted(device="other-gpu")])
    with pytest.raises(pool_mod.MixedDevicesError, match="'other-gpu'"):
        sweep.run(p, pool=pool)
    recs = store.read(store_dir / "scripted-gpu" / "matmul.jsonl")
    assert recs and all(r["timed_on"] == pool.lanes[0].timed_on for r in recs)


# ---- Ray -----------------------------------------------------------------------------------

def test_ray_missing_is_one_line_saying_what_to_install(monkeypatch, store_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    for cmd in (["check", "gelu", "--ray"], ["sweep", "gelu", "--ray", "local"]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.strip().splitlines() == ["Error: --ray needs Ray, which is not installed here: "
                                                 "pip install 'hlh_mlx[ray]'"]


# the variant BS=16,PAD=0 kills its Ray worker (this worker's parent) the first time it is asked
RAY_KILLER = textwrap.dedent("""
    import json, os, signal, sys, time
    log, marker = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        req = json.loads(line)
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "params": req.get("params")}) + "\\n")
        if req.get("params") == {"BS": 16, "PAD": 0} and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)
        sys.stdout.write(json.dumps({"status": "ok", "checks": []}) + "\\n")
        sys.stdout.flush()
""")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from hlh_mlx import ray_pool
    ray_pool.connect("local")  # what `--ray local` starts; every command below joins it
    yield ray
    ray.shutdown()


def test_ray_gives_the_serial_verdicts_and_records(ray_cluster, tmp_path, monkeypatch, buggy):
    out = {}
    for mode in ("serial", "ray"):
        d = tmp_path / mode
        monkeypatch.setenv("HLH_MLX_VARIANTS", str(d))
        extra = ["--ray", "local"] if mode == "ray" else []
        r = cli(*SWEEP, *extra)
        assert r.exit_code == 0, r.output
        c = cli(*CHECK, *extra)
        assert c.exit_code == 1, c.output
        out[mode] = (records(d), verdicts(c.output))
        if mode == "ray":
            assert "Ray task slots" in r.output and "r0: " in r.output
    assert out["serial"] == out["ray"]
    assert {r["status"] for r in out["serial"][0]} == STATUSES


def test_a_ray_task_whose_worker_dies_runs_again(ray_cluster, store_dir, tmp_path):
    w, log, marker = tmp_path / "worker.py", tmp_path / "log", tmp_path / "marker"
    w.write_text(RAY_KILLER)
    r = cli("sweep", "matmul", "--template", "tiled", "--ray", "--workers", "2",
            env={"HLH_MLX_WORKER": f"{sys.executable} {w} {log} {marker}"})
    assert r.exit_code == 0, r.output
    asked = [json.loads(x)["params"] for x in log.read_text().splitlines()]
    asked = [x for x in asked if x is not None]  # (a slot's warm-up asks with no variant)
    assert asked.count({"BS": 16, "PAD": 0}) == 2 and len(asked) == 7  # re-run by Ray; everything else once
    recs = store.read(store_dir / "emulator" / "matmul.jsonl")
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)  # nothing lost, no crash stored


# logs its pid and the kind of each request
# answers a ping after 6 s, as a real worker answers once it has loaded MLX and hlh_mlx: the
# two slots' warm-ups overlap, so Ray runs them in two workers (an instant answer would let
# one Ray worker take both, one after the other; so did 2 s once on a loaded CI box, where
# Ray's second worker took longer than that to start)
STARTS = textwrap.dedent("""
    import json, os, sys, time
    for line in sys.stdin:
        kind = json.loads(line)['kind']
        if kind == "ping":
            time.sleep(6)
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()} {kind}\\n")
        sys.stdout.write(json.dumps({"status": "ok", "checks": []}) + "\\n")
        sys.stdout.flush()
""")


def test_a_ray_pool_starts_its_workers_before_the_first_job(ray_cluster, tmp_path, monkeypatch):
    from hlh_mlx import ray_pool
    w, log = tmp_path / "worker.py", tmp_path / "log"
    w.write_text(STARTS)
    monkeypatch.setenv("HLH_MLX_WORKER", f"{sys.executable} {w} {log}")
    pool, _ = ray_pool.make(None, "emulator", 2)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) == 2):
            time.sleep(0.1)
        lines = [x.split() for x in log.read_text().splitlines()]
        assert len({pid for pid, _ in lines}) == 2 and {kind for _, kind in lines} == {"ping"}  # one per slot
    finally:
        pool.stop()


def test_a_ray_pool_leaves_the_cluster_it_joined_and_only_that(monkeypatch):
    from types import SimpleNamespace

    from hlh_mlx import ray_pool
    left = []
    monkeypatch.setattr(ray_pool, "_ray", lambda: SimpleNamespace(shutdown=lambda: left.append(1)))
    ray_pool.RayPool([ray_pool.RayLane("r0", None, {}, {}, False)], owns_connection=False).stop()
    assert left == []  # joined by the caller's own ray.init: theirs to leave
    p = ray_pool.RayPool([ray_pool.RayLane("r0", None, {}, {}, False)], owns_connection=True)
    p.stop()
    p.stop()
    assert left == [1]


# slow enough that the interrupt lands mid-sweep; logs its pid
SLOW = textwrap.dedent("""
    import json, os, sys, time
    log = sys.argv[1]
    for line in sys.stdin:
        req = json.loads(line)
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "params": req.get("params")}) + "\\n")
        time.sleep(0.5)
        sys.stdout.write(json.dumps({"status": "ok", "checks": []}) + "\\n")
        sys.stdout.flush()
""")


def test_interrupted_sweep_with_workers_keeps_what_finished_stops_its_workers_and_resumes(store_dir, tmp_path):
    w, log = tmp_path / "worker.py", tmp_path / "log"
    w.write_text(SLOW)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HLH_MLX_WORKER=f"{sys.executable} {w} {log}")
    cmd = [sys.executable, "-m", "hlh_mlx", "sweep", "matmul", "--template", "regblock", "--budget", "10",
           "--workers", "2"]
    path = store_dir / "emulator" / "matmul.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.read(path)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    before = store.read(path)
    assert 3 <= len(before) < 10
    for pid in {json.loads(x)["pid"] for x in log.read_text().splitlines()}:  # no worker outlives the sweep
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (store_dir / "emulator" / "matmul.jsonl.claims").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = store.read(path)
    assert len(after) == 10 and after[:len(before)] == before   # nothing redone, nothing lost
