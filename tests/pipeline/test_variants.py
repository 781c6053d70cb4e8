"""Spaces, constraints, backend limits, ids, sampling."""

import pytest

from hlh_mlx import templates, variants
from hlh_mlx.variants import SpaceError


def tmpl(name):
    return next(t for t in templates.discover("matmul") if t.name == name)


def test_limits_remove_variants_metal_would_refuse():
    t = tmpl("regblock.metal")
    for v in variants.expand(t):
        tx, ty, tz = v.threadgroup()
        assert tx * ty * tz <= 1024
        p = v.param_dict
        assert (p["BK"] * (p["BM"] + p["PAD"]) + p["BK"] * (p["BN"] + p["PAD"])) * 4 <= 32768
    reason = variants.why_invalid(t, {"BM": 32, "BN": 32, "BK": 8, "TM": 8, "TN": 8, "PAD": 0})
    assert reason and "constraint" in reason


def test_threadgroup_memory_limit_is_enforced(tmp_path):
    text = (tmpl("tiled.metal").text.replace("BS = [8, 16, 32]", "BS = [8, 16, 32, 64]")
            .replace('threadgroup = ["BS", "BS", "1"]', 'threadgroup = ["8", "8", "1"]'))
    p = tmp_path / "matmul" / "big.metal.j2"
    p.parent.mkdir()
    p.write_text(text)
    t = templates.load(p)
    assert variants.why_invalid(t, {"BS": 64, "PAD": 1}).endswith("bytes of threadgroup memory exceed 32768")
    kept = {(v.param_dict["BS"], v.param_dict["PAD"]) for v in variants.expand(t)}
    assert (64, 0) in kept and (64, 1) not in kept  # 32768 bytes fit exactly, 33024 do not


def test_dynamic_shared_memory_is_sized_and_limited():
    t = next(t for t in templates.discover("matmul") if t.name == "mma.cuda")
    p = {"BM": 128, "BN": 128, "BK": 32, "WM": 2, "WN": 2, "STAGES": 4, "SWZ": 8, "FB": 1}
    # 4 stages of padded A (128 x 40) and B (32 x 136) tiles of 2-byte elements
    assert variants.make(t, p).shared_memory() == 4 * (128 * 40 + 32 * 136) * 2
    assert all(v.shared_memory() <= variants.CUDA_SHARED_MEMORY_OPTIN for v in variants.expand(t))


def test_dynamic_shared_memory_over_the_opt_in_limit_is_refused(tmp_path):
    t = next(t for t in templates.discover("matmul") if t.name == "mma.cuda")
    p = tmp_path / "matmul" / "deep.cuda.j2"
    p.parent.mkdir()
    p.write_text(t.text.replace("STAGES = [3, 4]", "STAGES = [3, 4, 8]"))
    deep = templates.load(p)
    params = {"BM": 256, "BN": 128, "BK": 64, "WM": 4, "WN": 2, "SWZ": 1, "FB": 1}
    assert variants.why_invalid(deep, {**params, "STAGES": 4}) is None  # 217088 bytes fit
    assert variants.why_invalid(deep, {**params, "STAGES": 8}) == "0 + 434176 bytes of shared memory exceed 232448 per block"


def test_dynamic_shared_memory_is_refused_in_metal_templates(tmp_path):
    text = tmpl("tiled.metal").text.replace('threadgroup = ["BS", "BS", "1"]',
                                            'threadgroup = ["BS", "BS", "1"]\nshared_memory = "1024"')
    p = tmp_path / "matmul" / "dyn.metal.j2"
    p.parent.mkdir()
    p.write_text(text)
    with pytest.raises(templates.TemplateError, match="shared_memory .*CUDA templates") as e:
        templates.load(p)
    assert e.value.line == text.splitlines().index('shared_memory = "1024"') + 1


def test_make_refuses_unknown_and_out_of_space_values():
    t = tmpl("tiled.metal")
    with pytest.raises(SpaceError, match="unknown parameter"):
        variants.make(t, {"BS": 8, "PAD": 0, "Q": 1})
    with pytest.raises(SpaceError, match="outside the space"):
        variants.make(t, {"BS": 12, "PAD": 0})
    with pytest.raises(SpaceError, match="missing parameter"):
        variants.make(t, {"BS": 8})


def test_ids_are_stable_and_distinct():
    vs = variants.expand(tmpl("simdgroup.metal"))
    again = variants.expand(tmpl("simdgroup.metal"))
    assert [v.id for v in vs] == [v.id for v in again]
    assert len({v.id for v in vs}) == len(vs)


def test_sampling_is_seeded_and_neighbours_differ_by_one_step():
    vs = variants.expand(tmpl("regblock.metal"))
    a, b = variants.sample(vs, 10, seed=3), variants.sample(vs, 10, seed=3)
    assert [v.id for v in a] == [v.id for v in b] and len(a) == 10
    assert [v.id for v in variants.sample(vs, 10, seed=4)] != [v.id for v in a]
    best = vs[5]
    for n in variants.neighbours(best, vs):
        diff = [k for k in best.param_dict if best.param_dict[k] != n.param_dict[k]]
        assert len(diff) == 1
