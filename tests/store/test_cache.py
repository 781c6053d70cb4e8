"""The compile cache stays bounded: `hlh_mlx cache info|clean`, and sweeps evict down to
$HLH_MLX_CACHE_MAX after their run."""

import os
import sys
import time

import pytest
from click.testing import CliRunner

from hlh_mlx import cache
from hlh_mlx.cli import main

from .test_sweep_work import fake_worker  # noqa: F401

MB = 1 << 20


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("HLH_MLX_CACHE", str(d))
    monkeypatch.delenv("HLH_MLX_CACHE_MAX", raising=False)
    return d


def kernel(cache_dir, name, mb, age_s):
    """A cached kernel as the emulator lays it out, last used `age_s` ago."""
    d = cache_dir / "emulator" / "kernels" / name
    d.mkdir(parents=True)
    for f, size in (("kernel", mb * MB // 2), ("kernel.o", mb * MB // 2), ("kernel.cpp", 100)):
        (d / f).write_bytes(b"\0" * size)
        t = time.time() - age_s
        os.utime(d / f, (t, t))
    os.utime(d, (time.time() - age_s,) * 2)
    return d


def runtime(cache_dir, age_s=10 * 86400):
    d = cache_dir / "emulator" / "runtime-sanitize-abc"
    d.mkdir(parents=True)
    (d / "runtime.o").write_bytes(b"\0" * MB)
    t = time.time() - age_s
    os.utime(d / "runtime.o", (t, t))
    return d


def cli(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env)


def test_cache_info_reports_size_count_and_bound(cache_dir):
    for i in range(3):
        kernel(cache_dir, f"k{i}", 2, 3600 * (i + 1))
    r = cli("cache", "info", env={"HLH_MLX_CACHE_MAX": "500M"})
    assert r.exit_code == 0, r.output
    assert f"{cache_dir}: 6.0 MiB (3 kernels, 0 runtimes, 0 partial builds); bound 500.0 MiB" in r.output


def test_cache_clean_evicts_least_recently_used_first_and_keeps_what_is_in_use(cache_dir):
    old = [kernel(cache_dir, f"old{i}", 2, 86400 * (i + 2)) for i in range(3)]
    newer = kernel(cache_dir, "newer", 2, 3600)
    in_use = kernel(cache_dir, "in-use", 2, 5)
    rt = runtime(cache_dir)
    partial = cache_dir / "emulator" / "kernels" / ".build-x1"
    partial.mkdir()
    (partial / "kernel.o").write_bytes(b"\0" * MB)
    os.utime(partial / "kernel.o", (time.time() - 7200,) * 2)
    os.utime(partial, (time.time() - 7200,) * 2)
    r = cli("cache", "clean", "--max-size", "8M")
    assert r.exit_code == 0, r.output
    assert [d.exists() for d in old] == [True, False, False]  # the two least recently used went
    assert newer.exists() and in_use.exists() and rt.exists() and not partial.exists()
    assert cache.total_bytes() <= 8 * MB
    r = cli("cache", "clean", "--max-size", "0.5M")            # in-use entries and runtimes stay even then
    assert in_use.exists() and rt.exists() and not newer.exists()
    r = cli("cache", "clean", "--all")
    assert r.exit_code == 0 and list(cache_dir.iterdir()) == []


def test_a_sweep_keeps_the_cache_within_its_bound(cache_dir, store_dir, fake_worker):
    env, _ = fake_worker
    old = [kernel(cache_dir, f"old{i}", 2, 86400 * (i + 2)) for i in range(4)]
    r = cli("sweep", "matmul", "--template", "tiled", "--budget", "1",
            env={**env, "WORKER_SLEEP": "0", "HLH_MLX_CACHE_MAX": "3M"})
    assert r.exit_code == 0, r.output
    assert sum(d.exists() for d in old) == 1 and "cache: evicted 3 least recently used entries" in r.output


def test_a_bad_size_is_a_one_line_error(cache_dir):
    r = cli("cache", "clean", "--max-size", "lots")
    assert r.exit_code == 1 and "not a size: 'lots'" in r.output and "Traceback" not in r.output
    r = cli("cache", "info", env={"HLH_MLX_CACHE_MAX": "huge"})
    assert r.exit_code == 1 and "HLH_MLX_CACHE_MAX: not a size" in r.output


@pytest.mark.parametrize("command", [("cache", "info"), ("cache", "clean")])
def test_a_build_that_vanishes_while_the_cache_is_counted_is_skipped(cache_dir, monkeypatch, command):
    """Another process's partial build can be renamed or removed while `cache info` walks the
    cache (two sweeps at once are supported): that was a FileNotFoundError traceback."""
    import shutil
    kernel(cache_dir, "k0", 2, 3600)
    sub = cache_dir / "emulator" / "kernels" / ".build-racing" / "obj"
    sub.mkdir(parents=True)
    (sub / "kernel.o").write_bytes(b"\0" * 100)
    real = os.scandir

    def racing(path="."):
        if str(path).endswith("obj"):  # the other process finishes just before this folder is read
            shutil.rmtree(os.path.dirname(str(path)), ignore_errors=True)
        return real(path)
    monkeypatch.setattr(os, "scandir", racing)
    r = cli(*command)
    assert r.exit_code == 0 and "Traceback" not in r.output and r.exception is None, r.output
    assert (cache_dir / "emulator" / "kernels" / "k0").exists()
