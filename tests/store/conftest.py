import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """A fresh results folder for this test (and the processes it starts)."""
    d = tmp_path / "variants"
    monkeypatch.setenv("HLH_MLX_VARIANTS", str(d))
    return d


def record(i=0, **over) -> dict:
    """A valid results record (variant `v<i>` of matmul on the emulator)."""
    r = {"op": "matmul", "device": "emulator", "backend": "emulator", "variant_id": f"v{i}",
         "template": "matmul/tiled.metal.j2", "shape": {"M": 64, "N": 64, "K": 64}, "shape_str": "64x64x64",
         "dtype": "float32", "status": "ok", "correct": True, "source": "local"}
    r.update(over)
    return r


def python(code: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """Start a separate Python process running `code` (with this checkout importable)."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
