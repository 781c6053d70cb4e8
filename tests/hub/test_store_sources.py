"""Packs and the user's store: a pack's numbers are never shown as the user's own, a bad
results line is refused, corrupt trust and manifest files give one-line errors, and a
pull during a sweep loses none of the sweep's records (real processes)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from hlh_mlx import hub, store, tuned
from hlh_mlx.cli import main

from ..pipeline.test_tuned import variant, write
from .test_hub import SHAPE, _refused, _rehash, _republish, fake_hub, fresh, pushed, run  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
PACK = "hub:me/pack@0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    d = tmp_path / "variants"
    monkeypatch.setenv("HLH_MLX_VARIANTS", str(d))
    tuned.refresh()
    yield d
    tuned.refresh()


def _pack_record(v, ms, **over):
    common = {"op": "softmax", "device": "emulator", "backend": "emulator", "shape": SHAPE, "dtype": "float32",
              "shape_str": "8x512", "mlx": mx.__version__, "status": "ok", "source": PACK}
    return {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict, "family": "rows",
            "source_hash": v.source_hash, "correct": True, "timing": {"median_ms": ms}, **over}


def test_show_never_presents_a_packs_number_as_the_users_own(store_dir):
    v = variant("softmax", "rows")
    write(store_dir, "softmax", SHAPE, "float32", v, 0.7, 1.0)  # the user's own: 1.43x
    path = store_dir / "emulator" / "softmax.jsonl"
    store.append(path, _pack_record(v, 1.0, variant_id=None, template="builtin", params={}))
    store.append(path, _pack_record(v, 0.0001))  # the pack's faked 10000x
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator"])
    assert r.exit_code == 0, r.output
    assert "source local" in r.stdout and "0.7000" in r.stdout and "1.43x" in r.stdout
    assert "0.0001" not in r.stdout and "10000" not in r.stdout
    assert f"2 results from {PACK} are not shown" in r.stderr
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator",
                                                  "--source", "all", "--format", "json"])
    assert r.exit_code == 0, r.output
    tables = [json.loads(t) for t in r.stdout.replace("]\n[", "]\x00[").split("\x00")]
    assert [{row["source"] for row in t} for t in tables] == [{"local"}, {PACK}]  # one source per table
    mine, theirs = ({row["variant"].split()[-1]: row["median_ms"] for row in t} for t in tables)
    assert mine[v.id] == 0.7 and theirs[v.id] == 0.0001


def test_show_with_a_line_missing_fields_warns_and_goes_on(store_dir):
    v = variant("softmax", "rows")
    write(store_dir, "softmax", SHAPE, "float32", v, 0.7, 1.0)
    path = store_dir / "emulator" / "softmax.jsonl"
    with open(path, "a") as f:
        f.write('{"schema":1,"template":"builtin"}\n')
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator"])
    assert r.exit_code == 0 and "Traceback" not in r.output + r.stderr
    assert f"warning: {path}:3: skipping a results line that does not match the schema (missing fields op," \
        in r.stderr
    assert v.id in r.stdout


def test_pack_with_a_line_missing_fields_is_refused(tmp_path, fake_hub, pushed):
    def edit(d):
        with open(d / "results" / "softmax.jsonl", "a") as f:
            f.write('{"schema":1,"op":"softmax","device":"emulator","template":"builtin"}\n')
        _rehash(d)
    _republish(fake_hub, tmp_path, pushed, edit)
    _refused(tmp_path, fake_hub, "results/softmax.jsonl:3: not a results line (missing fields backend, variant_id")


def test_a_corrupt_trust_file_trusts_nothing_and_never_raises(store_dir):
    v = variant("softmax", "rows")
    write(store_dir, "softmax", SHAPE, "float32", v, 0.5, 1.0)
    trust = store_dir / ".packs" / "trusted.json"
    trust.parent.mkdir(parents=True)
    trust.write_text('{"me/pack": "hub:me/pa')  # cut short
    x = mx.array(np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match=r"trusted.json:1: unreadable trust file, no pack is trusted"):
        assert tuned.explain("softmax", x, axis=-1).startswith(f"variant {v.id}")  # local results still run
    assert not hub.is_trusted(PACK)


def test_the_trust_file_is_replaced_atomically(tmp_path, fake_hub, pushed):
    b, hf = fresh(tmp_path, "b")
    assert run(["pull", "me/pack", "--trust"], b, fake_hub.endpoint, hf).returncode == 0
    f = b / ".packs" / "trusted.json"
    before = f.stat().st_ino
    assert run(["trust", "me/pack", "--revoke"], b, fake_hub.endpoint, hf).returncode == 0
    assert f.stat().st_ino != before  # a new file renamed over it: never seen half written
    assert json.loads(f.read_text()) == {}


def test_a_corrupt_installed_manifest_is_reported_and_removable(tmp_path, fake_hub, pushed):
    b, hf = fresh(tmp_path, "b")
    assert run(["pull", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0
    m = b / ".packs" / "me--pack" / "manifest.json"
    m.write_text(m.read_text()[:50])
    r = run(["packs"], b, fake_hub.endpoint, hf)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"hub:me/pack  BROKEN: {m}:" in r.stdout and "installed manifest does not parse" in r.stdout
    r = run(["remove", "me/pack"], b, fake_hub.endpoint, hf)
    assert r.returncode == 0 and "2 results" in r.stdout, r.stderr
    assert store.read(b / "emulator" / "softmax.jsonl") == [] and "no packs" in run(["packs"], b, fake_hub.endpoint, hf).stdout


SLOW_OK_WORKER = textwrap.dedent("""
    import json, sys, time
    for line in sys.stdin:
        time.sleep(0.05)
        sys.stdout.write(json.dumps({"status": "ok", "checks": []}) + "\\n")
        sys.stdout.flush()
""")


def test_pull_during_a_sweep_loses_none_of_its_records(tmp_path, fake_hub, pushed):
    b, hf = fresh(tmp_path, "b")
    worker = tmp_path / "worker.py"
    worker.write_text(SLOW_OK_WORKER)
    env = dict(os.environ, HLH_MLX_VARIANTS=str(b), PYTHONPATH=str(ROOT), HLH_MLX_WORKER=f"{sys.executable} {worker}")
    sweep = subprocess.Popen([sys.executable, "-m", "hlh_mlx", "sweep", "softmax", "--budget", "40"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pulls = 0
    while sweep.poll() is None or pulls < 2:
        r = run(["pull" if pulls % 2 == 0 else "remove", "me/pack"], b, fake_hub.endpoint, hf)
        assert r.returncode == 0, r.stderr
        pulls += 1
    assert sweep.wait() == 0, sweep.stderr.read()
    mine = [r for r in store.read(b / "emulator" / "softmax.jsonl") if r["source"] == "local"]
    assert len(mine) == 40 and len({r["variant_id"] for r in mine}) == 40


def test_the_shipped_results_can_be_left_out_as_on_a_fresh_device(store_dir, monkeypatch):
    """The checkout's variants/ are the results shipped with hlh_mlx: read beside the store's
    own (labelled), unless HLH_MLX_SHIPPED=0 (what a device with none would see)."""
    from hlh_mlx import config
    shipped = store.load("nvidia-h200", "qgemv")
    assert shipped and {r["source"] for r in shipped} == {"shipped"}
    monkeypatch.setenv("HLH_MLX_SHIPPED", "0")
    config.reset()
    try:
        assert store.load("nvidia-h200", "qgemv") == []
    finally:
        monkeypatch.delenv("HLH_MLX_SHIPPED")
        config.reset()
    assert store.load("nvidia-h200", "qgemv") == shipped


def test_show_says_which_results_it_cannot_read_at_an_older_op_layout(store_dir):
    """Records from before an op gained a dimension (norm_qkv_rope's B) are left out with one
    note that names their shapes and the op's dims, and the rest is shown."""
    v = variant("softmax", "rows")
    write(store_dir, "softmax", SHAPE, "float32", v, 0.7, 1.0)
    write(store_dir, "softmax", {"R": 8, "C": 512, "X": 3}, "float32", v, 0.7, 1.0)  # an older layout: 8x512x3
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator"])
    assert r.exit_code == 0 and "Traceback" not in r.output + r.stderr
    assert "note: results from local at 1 shape(s) not shown (8x512x3): shape '8x512x3' needs 2 sizes (RxC)" \
        in r.stderr, r.stderr
    assert v.id in r.stdout and "8x512 float32" in r.stdout
