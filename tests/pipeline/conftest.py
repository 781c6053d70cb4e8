from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """Sweeps in tests write to a fresh results folder."""
    d = tmp_path / "variants"
    monkeypatch.setenv("HLH_MLX_VARIANTS", str(d))
    return d


@pytest.fixture
def extra_templates(tmp_path, monkeypatch):
    """A folder of extra templates (HLH_MLX_TEMPLATES) a test can write into."""
    d = tmp_path / "templates"
    monkeypatch.setenv("HLH_MLX_TEMPLATES", str(d))

    def write(op, name, text):
        p = d / op / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p
    return write


def copy_template(name):
    return (ROOT / "templates" / "matmul" / name).read_text()
