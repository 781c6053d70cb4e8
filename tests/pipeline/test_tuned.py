"""hlh_mlx.tuned picks stored winners, falls back visibly, and refuses stale results.

The emulator measures no speed, so these tests write the timing fields of the records
themselves (made-up numbers, in a temporary store) to drive the selection; the kernel
that then runs is the real template on the emulator, checked against MLX."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import config, store, templates, timing, tuned, variants


def variant(op, family):
    t = next(t for t in templates.discover(op) if t.family == family and t.backend == "metal")
    return variants.expand(t)[0]


def write(store_dir, op, shape, dtype, v, ms, base_ms, source_hash=None, host_us=None, base_host_us=None,
          method=timing.METHOD):
    path = store_dir / "emulator" / f"{op}.jsonl"
    common = {"op": op, "device": "emulator", "backend": "emulator", "shape": shape, "dtype": dtype,
              "shape_str": "x".join(str(x) for x in shape.values()), "mlx": mx.__version__, "status": "ok",
              "timing_method": method}
    store.append(path, {**common, "variant_id": None, "template": "builtin", "correct": True,
                        "timing": {"median_ms": base_ms, "host_us": base_host_us}})
    store.append(path, {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict,
                        "source_hash": source_hash or v.source_hash, "correct": True,
                        "timing": {"median_ms": ms, "host_us": host_us}})


pytestmark = pytest.mark.usefixtures("tuned_fresh")


def test_nearest_tuned_winner_runs_and_matches_mlx(store_dir, rng):
    v = variant("softmax", "rows")
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((2, 3, 500)).astype(np.float32))
    assert f"variant {v.id}" in tuned.explain("softmax", x, axis=-1) and "nearest tuned shape 8x512" in tuned.explain("softmax", x, axis=-1)
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)), rtol=1e-5, atol=1e-7)
    assert tuned.fallbacks() == {}


def test_a_variant_slower_than_the_builtin_is_not_used(store_dir, rng):
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", variant("softmax", "rows"), ms=2.0, base_ms=1.0)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    assert tuned.explain("softmax", x, axis=-1).startswith("built-in: no stored softmax variant beats the built-in end to end")
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)))
    assert sum(tuned.fallbacks().values()) == 1


def test_strict_mode_turns_a_fallback_into_an_error(store_dir, monkeypatch, rng):
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    x = mx.array(rng.standard_normal((4, 64)).astype(np.float32))
    with pytest.raises(tuned.FallbackError, match="HLH_MLX_STRICT=1 and the built-in would run"):
        tuned.rms_norm(x, mx.ones((64,)), 1e-5)


def test_a_remembered_fallback_is_still_counted_strict_and_forgotten_after_a_sweep(store_dir, monkeypatch, rng):
    """Fallbacks are remembered before binding (decode loops make the same call thousands
    of times); that shortcut must not hide them, survive strict mode, or outlive new results."""
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, w, 1e-5)), np.asarray(mx.fast.rms_norm(x, w, 1e-5)))
    assert sum(tuned.fallbacks().values()) == 1  # one distinct call: counted once, however often it runs
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()  # settings are read once; the remembered fallback must still obey the new one
    with pytest.raises(tuned.FallbackError):
        tuned.rms_norm(x, w, 1e-5)
    v = variant("rms_norm", "rows")
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    tuned.refresh()  # what a sweep in this process does
    np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, w, 1e-5)), np.asarray(mx.fast.rms_norm(x, w, 1e-5)),
                               rtol=2e-5, atol=1e-6)
    assert tuned.fallbacks() == {} and f"variant {v.id}" in tuned.explain("rms_norm", x, w, 1e-5)


def test_unsupported_arguments_fall_back_with_the_reason(rng):
    x = mx.array(rng.standard_normal((4, 64)).astype(np.float32))
    assert "need a weight" in tuned.explain("rms_norm", x, None, 1e-5)
    np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, None, 1e-5)),
                               np.asarray(mx.fast.rms_norm(x, None, 1e-5)), rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_any_epsilon_reaches_the_kernel(store_dir, rng, eps):
    """eps is data (Qwen's 1e-6, Llama's 1e-5): one tuned kernel serves both, and a large
    one shows that the kernel really reads it."""
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    tuned.refresh()
    np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, w, eps)), np.asarray(mx.fast.rms_norm(x, w, eps)),
                               rtol=2e-5, atol=1e-6)
    assert tuned.fallbacks() == {}


def test_stale_result_is_ignored_with_a_warning(store_dir, rng):
    write(store_dir, "gelu", {"N": 4096}, "float32", variant("gelu", "elementwise"), 0.1, 1.0, source_hash="0" * 16)
    x = mx.array(rng.standard_normal(4096).astype(np.float32))
    with pytest.warns(RuntimeWarning, match="template changed since it was tuned"):
        assert tuned.explain("gelu", x).startswith("built-in")


def test_stale_results_of_one_op_make_one_warning(store_dir, rng):
    for n in (4096, 8192, 16384):
        write(store_dir, "gelu", {"N": n}, "float32", variant("gelu", "elementwise"), 0.1, 1.0, source_hash="0" * 16)
    x = mx.array(rng.standard_normal(4096).astype(np.float32))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tuned.explain("gelu", x)
    stale = [str(w.message) for w in seen if "template changed" in str(w.message)]
    assert len(stale) == 1 and "ignoring 3 stored gelu variant(s)" in stale[0]


def test_a_winner_is_not_extrapolated_to_far_smaller_launches(store_dir, rng):
    write(store_dir, "softmax", {"R": 8192, "C": 4096}, "float32", variant("softmax", "rows"), ms=0.05, base_ms=0.07)
    small = mx.array(rng.standard_normal((1, 4096)).astype(np.float32))
    why = tuned.explain("softmax", small, axis=-1)
    assert why.startswith("built-in") and "tuned only at 8192x4096" in why and "--shape 1x4096" in why
    near = mx.zeros((4096, 4096))
    assert tuned.explain("softmax", near, axis=-1).startswith("variant ")
    other_regime = mx.zeros((2048, 16384))  # same bytes, 4x apart in each dimension
    assert "2x in a dimension" in tuned.explain("softmax", other_regime, axis=-1)


def test_an_unsupported_dtype_falls_back_visibly(store_dir, rng):
    x = mx.array(rng.standard_normal((4, 64)).astype(np.float32)).astype(mx.int32)
    assert "has no tuned kernels" in tuned.explain("softmax", x, axis=-1)
    w = mx.ones((64,), dtype=mx.int32)
    with pytest.raises(Exception) as builtin_error:
        mx.fast.rms_norm(x, w, 1e-5)
    for _ in range(2):
        with pytest.raises(type(builtin_error.value)) as ours:  # the built-in's own error, not a wrong answer
            tuned.rms_norm(x, w, 1e-5)
        assert str(ours.value) == str(builtin_error.value)
    assert not tuned.fallbacks()  # nothing ran: no fallback to count
    # a dtype the built-in takes and no kernel does: the built-in's answer, counted
    assert mx.array_equal(tuned.softmax(x, axis=-1), mx.softmax(x, axis=-1)).item()
    assert any("has no tuned kernels" in why for _, why in tuned.fallbacks())


@pytest.mark.parametrize("repeat_ms,chosen", [(0.55, True), (1.1, False)])
def test_a_win_smaller_than_its_runs_own_retiming_moved_is_not_used(store_dir, rng, repeat_ms, chosen):
    """A sweep times the built-in and its top pick a second time: a run whose re-timing of
    the winner moved 120% (0.5 then 1.1 ms) cannot show a 2x win over the built-in's 1.0 ms,
    one that moved 10% can."""
    v = variant("softmax", "rows")
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    common = {"op": "softmax", "device": "emulator", "backend": "emulator", "shape": {"R": 8, "C": 512},
              "dtype": "float32", "shape_str": "8x512", "mlx": mx.__version__, "status": "ok",
              "timing_method": timing.METHOD, "repeat": True, "correct": True}
    path = store_dir / "emulator" / "softmax.jsonl"
    store.append(path, {**common, "variant_id": None, "template": "builtin", "timing": {"median_ms": 1.0}})
    store.append(path, {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict,
                        "source_hash": v.source_hash, "timing": {"median_ms": repeat_ms}})
    tuned.refresh()
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    why = tuned.explain("softmax", x, axis=-1)
    assert why.startswith(f"variant {v.id}") is chosen, why
    if not chosen:
        assert "by more than its run's re-timing moved" in why
    np.testing.assert_allclose(np.asarray(tuned.softmax(x, axis=-1)), np.asarray(mx.softmax(x, axis=-1)),
                               rtol=1e-5, atol=1e-7)


def test_show_says_which_variants_the_selection_rule_may_use(store_dir):
    """`show`'s "usable" column is the selection rule's verdict per variant: a 2x win in a run
    whose re-timing moved 120% is not usable, and the tuned call runs the built-in."""
    from click.testing import CliRunner

    from hlh_mlx.cli import main
    v = variant("softmax", "rows")
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator", "--format", "csv"])
    assert r.exit_code == 0, r.output
    row = next(x for x in r.output.splitlines() if v.id in x)
    assert ",yes," in row
    path = store_dir / "emulator" / "softmax.jsonl"
    store.append(path, {"op": "softmax", "device": "emulator", "backend": "emulator", "shape": {"R": 8, "C": 512},
                        "dtype": "float32", "shape_str": "8x512", "mlx": mx.__version__, "status": "ok",
                        "timing_method": timing.METHOD, "repeat": True, "correct": True, "variant_id": v.id,
                        "template": v.template.relpath, "params": v.param_dict, "source_hash": v.source_hash,
                        "timing": {"median_ms": 1.1}})
    r = CliRunner().invoke(main, ["show", "softmax", "--device", "emulator", "--backend", "emulator", "--format", "csv"])
    row = next(x for x in r.output.splitlines() if v.id in x and ",ok," in x)
    assert ",no," in row
