"""Sweeps and the store: concurrent sweeps share the work (real processes), environmental
failures are retried, --retry-failed and --force, and the exit status."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from hlh_mlx import store, sweep
from hlh_mlx.cli import main

from .conftest import ROOT

# answers like a worker without building anything; logs every request (pid, params)
LOGGING_WORKER = textwrap.dedent("""
    import json, os, sys, time
    log = os.environ["WORKER_LOG"]
    barrier = os.environ.get("WORKER_BARRIER")  # a folder: wait there until N sweeps have started
    if barrier:
        n = int(os.environ["WORKER_BARRIER_N"])
        open(os.path.join(barrier, str(os.getppid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < n and time.time() < deadline:
            time.sleep(0.05)
    for line in sys.stdin:
        req = json.loads(line)
        with open(log, "a") as f:
            f.write(json.dumps({"sweep": os.getppid(), "params": req.get("params")}) + "\\n")
        time.sleep(float(os.environ.get("WORKER_SLEEP", "0.3")))
        status = os.environ.get("WORKER_STATUS", "ok")
        sys.stdout.write(json.dumps({"status": status, "checks": [],
                                     "error": None if status == "ok" else "wrong answer"}) + "\\n")
        sys.stdout.flush()
""")


@pytest.fixture
def fake_worker(tmp_path):
    w = tmp_path / "worker.py"
    w.write_text(LOGGING_WORKER)
    log = tmp_path / "worker.log"
    return {"HLH_MLX_WORKER": f"{sys.executable} {w}", "WORKER_LOG": str(log), "PYTHONPATH": str(ROOT)}, log


def asked(log):
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def results(store_dir, op="matmul"):
    return [json.loads(x) for x in (store_dir / "emulator" / f"{op}.jsonl").read_text().splitlines()]


def test_two_sweeps_of_one_op_share_the_work(store_dir, fake_worker, tmp_path):
    env, log = fake_worker
    cmd = [sys.executable, "-m", "hlh_mlx", "sweep", "matmul", "--template", "regblock", "--budget", "8"]
    barrier = tmp_path / "started"
    barrier.mkdir()
    # both sweeps are running (each holding a claim) before either gets an answer
    e = dict(os.environ, **env, WORKER_BARRIER=str(barrier), WORKER_BARRIER_N="2")
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    runs = asked(log)
    ids = [json.dumps(r["params"], sort_keys=True) for r in runs]
    assert len(ids) == 8 and len(set(ids)) == 8          # every variant ran once, in one sweep or the other
    assert len({r["sweep"] for r in runs}) == 2           # and both sweeps did some of it
    recs = results(store_dir)
    assert len(recs) == 8 and len({r["variant_id"] for r in recs}) == 8
    for out, _ in outs:                                   # each sweep still shows the whole table
        assert all(r["variant_id"] in out for r in recs)
    assert any("another sweep of matmul is running" in err for _, err in outs)


def test_a_claim_whose_owner_died_is_run_again(store_dir):
    p = sweep.plan("matmul", backend="emulator", template="tiled", budget=2)
    path = store.path_for(p.device.slug, "matmul")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    import socket
    claims = {json.dumps(list(sweep._key(p, v, p.shapes[0], "float32"))): {"pid": pid, "host": socket.gethostname(),
                                                                         "since": 0} for v in p.candidates}
    path.parent.mkdir(parents=True)
    store.Path(f"{path}.claims").write_text(json.dumps(claims))
    w = Scripted()
    sweep.run(p, worker=w)
    assert sorted(w.asked) == sorted(v.param_dict["BS"] for v in p.candidates)
    assert not store.Path(f"{path}.claims").exists()   # released


class Scripted:
    """A worker that answers from a script: status per BS (default ok)."""

    def __init__(self, status=None):
        self.status, self.asked = status or {}, []

    def request(self, job, timeout):
        bs = job["params"]["BS"]
        self.asked.append(bs)
        s = self.status.get(bs, "ok")
        err = {"ok": None, "timeout": f"no result within {timeout:g} s (hang?)", "incorrect": "max rel err 1.0",
               "error": "[emulator] no C++ compiler found (tried g++). Install one: `apt-get install g++`"}[s]
        return {"status": s, "error": err, "checks": []}

    def stop(self):
        pass


def _plan(**kw):
    return sweep.plan("matmul", backend="emulator", template="tiled", budget=3, **kw)


def test_environmental_failures_are_retried_and_real_ones_kept(store_dir):
    p = _plan()
    bs = [v.param_dict["BS"] for v in p.candidates]
    first = Scripted({bs[0]: "timeout", bs[1]: "error", bs[2]: "incorrect"})
    sweep.run(p, worker=first)
    assert sorted(first.asked) == sorted(bs)
    again = Scripted()
    records = sweep.run(p, worker=again)
    assert sorted(again.asked) == sorted(bs[:2])   # the timeout and the missing compiler; not the wrong answer
    latest = {r["variant_id"]: r["status"] for r in records}
    assert sorted(latest.values()) == ["incorrect", "ok", "ok"]
    third = Scripted()
    sweep.run(p, worker=third)
    assert third.asked == []                       # nothing left to retry


def test_retry_failed_and_force(store_dir):
    p = _plan()
    bs = [v.param_dict["BS"] for v in p.candidates]
    sweep.run(p, worker=Scripted({bs[0]: "incorrect"}))
    w = Scripted()
    sweep.run(_plan(retry_failed=True), worker=w)
    assert w.asked == [bs[0]]
    w = Scripted()
    sweep.run(_plan(force=True), worker=w)
    assert sorted(w.asked) == sorted(bs)


def test_sweep_exits_nonzero_when_nothing_passed(store_dir, fake_worker):
    env, _ = fake_worker
    r = CliRunner().invoke(main, ["sweep", "matmul", "--template", "tiled", "--budget", "2"],
                           env={**env, "WORKER_STATUS": "incorrect", "WORKER_SLEEP": "0"})
    assert r.exit_code == 1, r.output
    assert "no variant passed (2 failed: incorrect)" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["sweep", "matmul", "--template", "tiled", "--budget", "2", "--retry-failed"],
                           env={**env, "WORKER_SLEEP": "0"})
    assert r.exit_code == 0, r.output


def test_no_compiler_fails_the_sweep_then_a_rerun_with_one_retries(store_dir):
    """The README's first command on a machine without g++: exit 1, saying why; after
    installing one, the rerun runs the variants instead of showing the stored errors."""
    cmd = [sys.executable, "-m", "hlh_mlx", "sweep", "matmul", "--template", "naive", "--budget", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HLH_MLX_CXX="no-such-compiler-g++")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no variant passed" in r.stderr and "no C++ compiler" in r.stdout, r.stderr
    assert "retried on the next run" in r.stderr
    env.pop("HLH_MLX_CXX")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = results(store_dir)
    assert [x["status"] for x in recs] == ["error", "error", "ok", "ok"]


def test_a_sweep_ranks_and_refines_from_local_results_only(store_dir):
    """A pack's record of the same variant shares the file: the sweep still runs the
    variant itself and returns (prints, ranks) only its own results."""
    p = _plan()
    v = p.candidates[0]
    path = store.path_for(p.device.slug, "matmul")
    theirs = {**sweep._record(p, p.shapes[0], "float32", {"status": "ok", "timing": {"median_ms": 0.0001}}, v),
              "source": "hub:me/pack@abc"}
    store.append(path, theirs)
    w = Scripted()
    records = sweep.run(p, worker=w)
    assert v.param_dict["BS"] in w.asked
    assert {r["source"] for r in records} == {"local"} and len(records) == 3


def test_a_variant_that_keeps_hanging_is_not_retried_forever(store_dir):
    p = _plan()
    bs = p.candidates[0].param_dict["BS"]
    everything = sorted(v.param_dict["BS"] for v in p.candidates)
    for expected in (everything, [bs], []):  # hangs once, is retried, hangs again: then it stays
        w = Scripted({bs: "timeout"})
        sweep.run(p, worker=w)
        assert sorted(w.asked) == expected
    w = Scripted()
    sweep.run(_plan(retry_failed=True), worker=w)  # the user asks: it runs again
    assert w.asked == [bs]
