"""Packs through the real huggingface_hub client against a local stand-in of the Hub
(tests/hub/fakehub.py, 127.0.0.1, pointed at through HF_ENDPOINT): push from one store,
pull into another, offline pulls from the HF cache, and every bad input refused with the
store left as it was. `hlh_mlx push/pull` run as separate processes, as a user runs them,
so huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE from the environment."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import hub, store, templates, tuned

from ..pipeline.test_tuned import variant, write
from .fakehub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
SHAPE = {"R": 8, "C": 512}


@pytest.fixture
def fake_hub():
    with FakeHub() as h:
        yield h


def run(args, variants_dir, hub_endpoint, hf_home, **env):
    e = dict(os.environ, HLH_MLX_VARIANTS=str(variants_dir), HF_ENDPOINT=hub_endpoint, HF_HOME=str(hf_home),
             HF_TOKEN="hf_test", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
             PYTHONPATH=str(ROOT), **env)
    if "HF_HUB_OFFLINE" not in env:
        e.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "hlh_mlx", *args], capture_output=True, text=True, env=e,
                          timeout=120)


def snapshot(d: Path) -> dict:
    """Every file under a store with its bytes: to show a refused pull changed nothing."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


@pytest.fixture
def pushed(tmp_path, fake_hub):
    """Store A with a tuned softmax (made-up timings: the emulator times nothing), pushed."""
    a = tmp_path / "a"
    write(a, "softmax", SHAPE, "float32", variant("softmax", "rows"), 0.5, 1.0)
    r = run(["push", "me/pack", "--device", "emulator"], a, fake_hub.endpoint, tmp_path / "hf-a")
    assert r.returncode == 0, r.stderr
    assert f"{fake_hub.endpoint}/me/pack" in r.stdout
    return a


def fresh(tmp_path, name):
    return tmp_path / name, tmp_path / f"hf-{name}"


def test_push_then_pull_round_trips_between_two_stores(tmp_path, fake_hub, pushed, monkeypatch):
    files = fake_hub.commit("me/pack", "main")[1]
    manifest = json.loads(files["manifest.json"])
    assert manifest["format"] == hub.PACK_FORMAT and manifest["device"] == "emulator" and manifest["ops"] == ["softmax"]
    assert {"results/softmax.jsonl", "templates/softmax/rows.metal.j2"} <= set(manifest["files"])
    assert any(p.startswith("sources/softmax/") and p.endswith(".metal") for p in manifest["files"])

    b, hf = fresh(tmp_path, "b")
    r = run(["pull", "me/pack"], b, fake_hub.endpoint, hf)
    assert r.returncode == 0, r.stderr
    commit = fake_hub.commit("me/pack", "main")[0]
    source = f"hub:me/pack@{commit}"
    assert source in r.stdout and "NOT trusted" in r.stdout and "template templates/softmax/rows.metal.j2" in r.stdout
    pulled = store.read(b / "emulator" / "softmax.jsonl")
    original = store.read(pushed / "emulator" / "softmax.jsonl")
    assert [dict(x, source=None) for x in pulled] == [dict(x, source=None) for x in original]
    assert {x["source"] for x in pulled} == {source}
    shown = run(["show", "softmax", "--device", "emulator", "--source", source], b, fake_hub.endpoint, hf)
    assert shown.returncode == 0 and variant("softmax", "rows").id in shown.stdout, shown.stderr

    # untrusted: tuned ignores the pack and says so; trusted: its winner runs
    monkeypatch.setenv("HLH_MLX_VARIANTS", str(b))
    tuned.refresh()
    x = mx.array(np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32))
    assert "untrusted pack" in tuned.explain("softmax", x, axis=-1)
    assert run(["trust", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0
    tuned.refresh()
    assert tuned.explain("softmax", x, axis=-1).startswith("variant ")
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)), rtol=1e-5, atol=1e-7)
    tuned.refresh()

    removed = run(["remove", "me/pack"], b, fake_hub.endpoint, hf)
    assert removed.returncode == 0 and "2 results" in removed.stdout, removed.stderr
    assert store.read(b / "emulator" / "softmax.jsonl") == [] and "no packs" in run(["packs"], b, fake_hub.endpoint, hf).stdout


def test_offline_pull_uses_the_hf_cache(tmp_path, fake_hub, pushed):
    b, hf = fresh(tmp_path, "b")
    assert run(["pull", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0
    c = tmp_path / "c"
    r = run(["pull", "me/pack"], c, "http://127.0.0.1:9", hf, HF_HUB_OFFLINE="1")  # nothing listens on port 9
    assert r.returncode == 0, r.stderr
    assert len(store.read(c / "emulator" / "softmax.jsonl")) == 2


def test_no_network_and_no_cache_is_a_clear_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    b, hf = fresh(tmp_path, "b")
    r = run(["pull", "me/pack"], b, dead, hf)
    assert r.returncode == 1 and "could not reach the Hub" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(b) == {}


def test_unknown_repo_is_a_clear_error(tmp_path, fake_hub):
    b, hf = fresh(tmp_path, "b")
    r = run(["pull", "nobody/nothing"], b, fake_hub.endpoint, hf)
    assert r.returncode == 1 and "repository not found" in r.stderr and "Traceback" not in r.stderr


def _republish(fake_hub, tmp_path, pushed, edit):
    """Upload a modified copy of the pushed pack as a new commit (edit(folder) -> None)."""
    from huggingface_hub import HfApi
    d = tmp_path / "pack-edit"
    for path, data in fake_hub.commit("me/pack", "main")[1].items():
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_bytes(data)
    edit(d)
    HfApi(endpoint=fake_hub.endpoint, token="hf_test").upload_folder(folder_path=str(d), repo_id="me/pack")


def _rehash(d: Path, **changes):
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {p: hub._sha256(d / p) for p in m["files"] if (d / p).exists()}
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


def _refused(tmp_path, fake_hub, message):
    b, hf = fresh(tmp_path, "b")
    b.mkdir()
    write(b, "softmax", SHAPE, "float32", variant("softmax", "rows"), 0.7, 1.0)  # the user's own results
    before = snapshot(b)
    r = run(["pull", "me/pack"], b, fake_hub.endpoint, hf)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(b) == before  # nothing half-installed


def test_tampered_file_refuses_the_whole_pack(tmp_path, fake_hub, pushed):
    lines = fake_hub.commit("me/pack", "main")[1]["results/softmax.jsonl"].decode().splitlines()
    faster = json.loads(lines[1])
    faster["timing"]["median_ms"] = 0.001
    fake_hub.tamper("me/pack", "results/softmax.jsonl", (lines[0] + "\n" + json.dumps(faster) + "\n").encode())
    _refused(tmp_path, fake_hub, "results/softmax.jsonl: sha256 does not match")


def test_wrong_pack_format_is_refused(tmp_path, fake_hub, pushed):
    _republish(fake_hub, tmp_path, pushed, lambda d: _rehash(d, format=99))
    _refused(tmp_path, fake_hub, "pack format version 99")


def test_manifest_naming_a_file_outside_the_pack_is_refused(tmp_path, fake_hub, pushed):
    def edit(d):
        _rehash(d)
        m = json.loads((d / "manifest.json").read_text())
        m["files"]["../../.ssh/authorized_keys"] = "0" * 64
        (d / "manifest.json").write_text(json.dumps(m))
    _republish(fake_hub, tmp_path, pushed, edit)
    _refused(tmp_path, fake_hub, "outside the pack")


def test_results_line_that_does_not_parse_is_refused(tmp_path, fake_hub, pushed):
    def edit(d):
        with open(d / "results" / "softmax.jsonl", "a") as f:
            f.write("{not json\n")
        _rehash(d)
    _republish(fake_hub, tmp_path, pushed, edit)
    _refused(tmp_path, fake_hub, "results/softmax.jsonl:3: results line does not parse")


def test_untrusted_pack_code_is_never_loaded(tmp_path, fake_hub, pushed, monkeypatch):
    """A pack whose template differs from ours (same name, other code): pulled without
    trust its template is never even parsed; trusted, that pack's kernel is what runs."""
    v = variant("softmax", "rows")

    def edit(d):
        t = d / "templates" / "softmax" / "rows.metal.j2"
        t.write_text(t.read_text() + "// a pack's own version\n")
        theirs = next(x for x in __import__("hlh_mlx").variants.expand(templates.load(t)) if x.params == v.params)
        lines = [json.loads(x) for x in (d / "results" / "softmax.jsonl").read_text().splitlines()]
        for x in lines:
            if x.get("variant_id"):
                x.update(variant_id=theirs.id, source_hash=theirs.source_hash)
        (d / "results" / "softmax.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        _rehash(d)
    _republish(fake_hub, tmp_path, pushed, edit)
    b, hf = fresh(tmp_path, "b")
    assert run(["pull", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0

    monkeypatch.setenv("HLH_MLX_VARIANTS", str(b))
    real_load = templates.load
    loaded = []
    monkeypatch.setattr(templates, "load", lambda p: loaded.append(str(p)) or real_load(p))
    tuned.refresh()
    x = mx.array(np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32))
    assert tuned.explain("softmax", x, axis=-1).startswith("built-in")
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)), rtol=1e-6)
    assert not [p for p in loaded if ".packs" in p]

    assert run(["trust", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0
    tuned.refresh()
    choice = tuned.explain("softmax", x, axis=-1)
    assert choice.startswith("variant ") and v.id not in choice  # the pack's variant, not ours
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)), rtol=1e-5, atol=1e-7)
    assert [p for p in loaded if ".packs" in p]
    tuned.refresh()


def test_bad_repo_id_and_nothing_to_push(tmp_path, fake_hub):
    a = tmp_path / "a"
    r = run(["push", "../evil", "--device", "emulator"], a, fake_hub.endpoint, tmp_path / "hf")
    assert r.returncode == 1 and "bad repo id" in r.stderr
    r = run(["push", "me/pack", "--device", "emulator"], a, fake_hub.endpoint, tmp_path / "hf")
    assert r.returncode == 1 and "no local results to push" in r.stderr
    assert fake_hub.repos == {}


def test_trust_is_per_commit(tmp_path, fake_hub, pushed):
    b, hf = fresh(tmp_path, "b")
    assert run(["pull", "me/pack", "--trust"], b, fake_hub.endpoint, hf).returncode == 0
    assert "trusted" in run(["packs"], b, fake_hub.endpoint, hf).stdout
    assert run(["pull", "me/pack"], b, fake_hub.endpoint, hf).returncode == 0  # same commit: still trusted
    assert "not trusted" not in run(["packs"], b, fake_hub.endpoint, hf).stdout
    _republish(fake_hub, tmp_path, pushed, lambda d: _rehash(d, created="later"))  # a new commit
    r = run(["pull", "me/pack"], b, fake_hub.endpoint, hf)
    assert r.returncode == 0 and "NOT trusted" in r.stdout  # a new commit must be trusted again
    assert "not trusted" in run(["packs"], b, fake_hub.endpoint, hf).stdout
