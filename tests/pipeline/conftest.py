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


@pytest.fixture
def tuned_fresh(store_dir, monkeypatch):
    """An empty store, HLH_MLX_STRICT unset and nothing decided, before the test and after
    (a test file of tuned calls: `pytestmark = pytest.mark.usefixtures("tuned_fresh")`)."""
    from hlh_mlx import tuned
    monkeypatch.delenv("HLH_MLX_STRICT", raising=False)
    tuned.refresh()
    yield
    tuned.refresh()


def rel_error(got, want) -> float:
    """||got - want|| / ||want|| in float64."""
    import mlx.core as mx
    import numpy as np
    g, w = (np.asarray(t.astype(mx.float32)).astype(np.float64) for t in (got, want))
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


# (mantissa bits, smallest normal exponent) of each dtype
_FLOAT_FORMAT = {"float32": (23, -126), "float16": (10, -14), "bfloat16": (7, -126)}


def ulp(magnitude, dtype: str):
    """The spacing of `dtype`'s values at each |value| in `magnitude` (a numpy array): 2^(e - m)
    for a value in [2^e, 2^(e+1)), and the subnormals' fixed spacing below the smallest normal."""
    import numpy as np
    m, e_min = _FLOAT_FORMAT[dtype]
    v = np.asarray(magnitude, dtype=np.float64)
    e = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    return np.exp2(np.maximum(np.where(v > 0, e, e_min), e_min) - m)


@pytest.fixture
def check_fails_on(store_dir, extra_templates):
    """`check_fails_on(op, source, old, new, params, dtype)`: `hlh_mlx check` of a copy of a
    Metal template with one slip in it (`old` -> `new`) must fail for the numbers it gets
    wrong (a relative error, integer outputs not the reference's, or elements left unwritten)."""
    from click.testing import CliRunner

    from hlh_mlx.cli import main

    def run(op, source, old, new, params: dict, dtype: str):
        assert source.count(old) == 1, "the template changed: update the broken copy"
        extra_templates(op, "broken.metal.j2", source.replace(old, new))
        args = ["check", op, "broken", "--dtype", dtype] + [a for k, v in params.items() for a in ("-p", f"{k}={v}")]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        assert any(m in r.output for m in ("relative error", "NaN/inf (unwritten?)", "integer outputs differ")), r.output
    return run


def copy_template(name, op="matmul"):
    return (ROOT / "templates" / op / name).read_text()
