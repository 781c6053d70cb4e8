"""How hlh_mlx times and runs tuned kernels, checked on the CPU: the timing order (a
dependent chain, host cost beside it), selection by what a program pays end to end, the
dispatch path (each distinct call decided once), mx.compile and mx.grad through it, and
arguments the built-in accepts that our kernels do not."""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import backends, config, runtime, select, timing, tuned
from tests.pipeline.test_tuned import variant, write

pytestmark = pytest.mark.usefixtures("tuned_fresh")


# -- timing ---------------------------------------------------------------------------

def test_a_chain_feeds_every_call_the_previous_calls_output():
    seen = []

    def fn(x, one):
        y = x + one
        seen.append(y)
        return [y]
    sets = [[mx.zeros((4, 8)), mx.ones((4, 8))], [mx.zeros((4, 8)), mx.ones((4, 8))]]
    t = timing.measure(fn, sets, cache_resident=True, warmup=0, repeats=1, max_batch=6, target_ms=1e9)
    assert t.mode == "chain" and t.link == "view" and t.batch == 6
    last = [float(y[0, 0].item()) for y in seen[-6:]]
    assert last == [1, 2, 3, 4, 5, 6]  # independent calls would all give 1


def test_independent_calls_are_throughput_and_say_so():
    seen = []

    def fn(x, one):
        seen.append(x + one)
        return [seen[-1]]
    sets = [[mx.zeros((4, 8)), mx.ones((4, 8))]]
    t = timing.measure(fn, sets, cache_resident=True, chain=False, warmup=0, repeats=1, max_batch=3, target_ms=1e9)
    assert t.mode == "batch" and t.link == "none"
    assert [float(y[0, 0].item()) for y in seen[-3:]] == [1, 1, 1]


def test_a_smaller_output_is_copied_over_the_front_of_the_next_input():
    prev = mx.arange(4, dtype=mx.float16).reshape(1, 4)
    x = mx.full((1, 10), 7, dtype=mx.float16)
    y, link = timing.chained(prev, x)
    assert link == "copy" and y.shape == x.shape and y.dtype == x.dtype
    assert y.tolist() == [[0, 1, 2, 3, 7, 7, 7, 7, 7, 7]]
    big = mx.arange(12, dtype=mx.float16).reshape(3, 4)
    z, link = timing.chained(big, x)
    assert link == "view" and z.reshape(-1).tolist() == list(range(10))


def test_measure_all_stores_host_cost_and_throughput_only_when_asked():
    fn = lambda x, w: [x * w]  # noqa: E731
    sets = [[mx.ones((8, 8)), mx.ones((8, 8))]] * 2
    t = timing.measure_all(fn, sets, cache_resident=True).to_dict()
    assert t["host_us"] > 0 and t["throughput_ms"] is None and t["mode"] == "chain"
    t2 = timing.measure_all(fn, sets, cache_resident=True, throughput=True)
    assert t2.throughput_ms is not None and t2.throughput_ms > 0
    assert timing.end_to_end_ms(t) == pytest.approx(t["median_ms"] + t["host_us"] / 1e3)
    assert 0 < t["encode_us"] < t["host_us"]  # the host cost counts MLX's encoding as well


def test_host_cost_counts_the_encoding_of_every_node(monkeypatch):
    """A call whose graph has many nodes costs more to encode than one with a single node,
    and the encode round never allocates more than ENCODE_BYTES of outputs (at least 4 calls)."""
    x = mx.ones((64,))
    one = lambda a: a + 1  # noqa: E731

    def many(a):
        for _ in range(40):
            a = a * 1.0001
        return a
    _, enc_one = timing.host_parts(one, [x], calls=50)
    _, enc_many = timing.host_parts(many, [x], calls=50)
    assert enc_many > 5 * enc_one
    seen = []
    real = mx.async_eval
    monkeypatch.setattr(timing.mx, "async_eval", lambda outs: (seen.append(len(outs)), real(outs)))
    monkeypatch.setattr(timing, "ENCODE_BYTES", 64 * 4 * 10)  # room for 10 outputs of 256 bytes
    timing.host_parts(one, [x], calls=50)
    assert seen and set(seen) == {10}


# -- selection ------------------------------------------------------------------------

def test_a_variant_faster_on_the_gpu_but_slower_end_to_end_is_not_used(store_dir, rng):
    v = variant("softmax", "rows")
    # 10 us faster per call on the GPU, 30 us more host time: a program pays more
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.040, base_ms=0.050,
          host_us=31.0, base_host_us=1.0)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    assert tuned.explain("softmax", x, axis=-1).startswith("built-in: no stored softmax variant beats the built-in end to end")


def test_a_variant_faster_end_to_end_is_used_and_explained_with_both_costs(store_dir, rng):
    v = variant("softmax", "rows")
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.020, base_ms=0.050,
          host_us=2.0, base_host_us=1.0)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    why = tuned.explain("softmax", x, axis=-1)
    assert why.startswith(f"variant {v.id}") and "host 2.0 us" in why and "vs built-in 0.0500 ms, host 1.0 us" in why
    assert "2.32x the built-in end to end" in why and "2.50x on GPU chain latency" in why  # 0.051 / 0.022


def test_a_win_inside_the_noise_of_the_two_timings_is_not_used(store_dir, rng):
    """Median 4.5 vs 5.6 us, but the built-in's fast samples (3.7 us) beat the variant's slow
    ones (5.0 us): a launch-bound kernel whose 'win' is timing noise."""
    from hlh_mlx import store
    v = variant("softmax", "rows")
    path = store_dir / "emulator" / "softmax.jsonl"
    common = {"op": "softmax", "device": "emulator", "backend": "emulator", "shape": {"R": 8, "C": 512},
              "dtype": "float32", "shape_str": "8x512", "mlx": mx.__version__, "status": "ok",
              "timing_method": timing.METHOD}
    store.append(path, {**common, "variant_id": None, "template": "builtin", "correct": True,
                        "timing": {"median_ms": 0.0056, "p10_ms": 0.0037, "p90_ms": 0.0060, "host_us": 0.5}})
    store.append(path, {**common, "variant_id": v.id, "template": v.template.relpath, "params": v.param_dict,
                        "source_hash": v.source_hash, "correct": True,
                        "timing": {"median_ms": 0.0045, "p10_ms": 0.0044, "p90_ms": 0.0050, "host_us": 0.5}})
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    assert tuned.explain("softmax", x, axis=-1).startswith("built-in"), "a win inside the noise was used"


def test_results_of_older_timing_methods_are_history(store_dir, rng):
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", variant("softmax", "rows"), ms=0.01, base_ms=1.0,
          method=3)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    assert tuned.explain("softmax", x, axis=-1).startswith("built-in")
    assert select.MIN_METHOD == 4 <= timing.METHOD


# -- dispatch -------------------------------------------------------------------------

@pytest.fixture
def resolves(monkeypatch):
    calls = []
    real = runtime.resolve

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)
    monkeypatch.setattr(runtime, "resolve", counting)
    return calls


def test_each_distinct_call_is_decided_once(store_dir, rng, resolves):
    v = variant("rms_norm", "rows")
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    for _ in range(4):
        x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))  # new values, same signature
        np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, w, 1e-5)), np.asarray(mx.fast.rms_norm(x, w, 1e-5)),
                                   rtol=2e-5, atol=1e-6)
    assert resolves == ["rms_norm"]
    tuned.rms_norm(x.astype(mx.float16), w.astype(mx.float16), 1e-5)  # another dtype: decided again
    tuned.rms_norm(x, w, 1e-6)                                          # another eps: decided again
    assert resolves == ["rms_norm"] * 3


def test_one_rope_plan_serves_every_offset(store_dir, rng, resolves):
    v = variant("rope", "pairs")
    write(store_dir, "rope", {"R": 4, "T": 1, "D": 64, "TRAD": 0}, "float32", v, ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    for offset in (0, 7, 300, 1023):
        kw = dict(traditional=False, base=10000.0, scale=1.0, offset=offset)
        got, ref = np.asarray(tuned.rope(x, 64, **kw)), np.asarray(mx.fast.rope(x, 64, **kw))
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4  # rope's float32 tolerance (angles ~ offset)
    assert resolves == ["rope"] and tuned.fallbacks() == {}


def test_an_offset_the_kernel_does_not_take_gets_the_builtin_from_a_tuned_plan(store_dir, rng, resolves,
                                                                                monkeypatch):
    # the plan is made for ints; an int the kernel cannot take (negative: the table would be
    # read from its end) must answer as the built-in does, counted as a fallback
    v = variant("rope", "pairs")
    write(store_dir, "rope", {"R": 4, "T": 1, "D": 64, "TRAD": 0}, "float32", v, ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    for offset in (5, -3, -1, 2 ** 25):
        kw = dict(traditional=False, base=10000.0, scale=1.0, offset=offset)
        _same(tuned.rope(x, 64, **kw), mx.fast.rope(x, 64, **kw))
    assert resolves == ["rope"] and sum(tuned.fallbacks().values()) == 3
    # a bool is no offset to MLX (ValueError): the kernel must not take it as 1
    kw = dict(traditional=False, base=10000.0, scale=1.0, offset=True)
    with pytest.raises(ValueError) as builtin:
        mx.fast.rope(x, 64, **kw)
    with pytest.raises(ValueError) as ours:
        tuned.rope(x, 64, **kw)
    assert str(ours.value) == str(builtin.value)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()
    with pytest.raises(tuned.FallbackError, match="offset=-3"):
        tuned.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=-3)


def test_scales_given_as_arrays_get_the_builtin(rng):
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    kw = dict(traditional=False, base=10000.0, offset=3)
    _same(tuned.rope(x, 64, scale=mx.array(0.5), **kw), mx.fast.rope(x, 64, scale=mx.array(0.5), **kw))
    from hlh_mlx.ops import decode_attention, rope
    assert "scale" in rope.bind(x, 64, scale=mx.array(0.5), freqs=None, **kw)
    q, k = mx.zeros((1, 4, 1, 64)), mx.zeros((1, 2, 8, 64))
    assert "scale" in decode_attention.bind(q, k, k, scale=mx.array(0.1))


class _RopeGraphKernel:
    """rope's kernel as an MLX graph (as _GraphKernel for rms_norm): reads every input."""

    def __init__(self, variant, backend):
        pass

    def launcher(self, shape, dtype, out_shapes, out_dtypes):
        return lambda x, inv, pos, off: [mx.fast.rope(x, shape["D"], traditional=False, base=None, scale=pos[0],
                                                      offset=off[0], freqs=1.0 / inv).reshape(out_shapes[0])]


def test_random_inputs_may_be_passed_to_a_compiled_function_beside_a_tuned_call(store_dir, rng, monkeypatch):
    # an op's random offset is a view of its own, not the runtime's cached one: a trace that
    # got the cached array as an input and from the tuned call too would be refused by MLX
    # ("uncaptured inputs")
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))
    monkeypatch.setattr(backends, "Kernel", _RopeGraphKernel)
    from hlh_mlx import ops
    shape = {"R": 4, "T": 1, "D": 64, "TRAD": 0}
    write(store_dir, "rope", shape, "float32", variant("rope", "pairs"), ms=0.5, base_ms=1.0)
    x, _, _, off = ops.get("rope").make_inputs(shape, mx.float32, rng)
    o = int(off.item())
    kw = dict(traditional=False, base=10000.0, scale=1.0, offset=o)
    x = x.reshape(1, 4, 1, 64)
    got = mx.compile(lambda x, off: tuned.rope(x, 64, **kw) + 0 * off)(x, off)
    # normwise: the stand-in turns by 1 / inv_freq where the built-in takes base=, an angle
    # an ulp or so apart times the offset, which an element near zero cannot absorb
    want = np.asarray(mx.fast.rope(x, 64, **kw))
    assert np.linalg.norm(np.asarray(got) - want) <= 1e-5 * np.linalg.norm(want)
    assert tuned.fallbacks() == {}


def test_a_traced_variant_refuses_a_bool_offset_as_mlx_does(store_dir, rng, monkeypatch, traced):
    """MLX's rope refuses offset=True; the traced path hands a value its conversion refuses
    to the trace as given, so the kernel's binding must refuse it too (not turn by 1)."""
    monkeypatch.setattr(backends, "Kernel", _RopeGraphKernel)
    write(store_dir, "rope", {"R": 4, "T": 1, "D": 64, "TRAD": 0}, "float32", variant("rope", "pairs"),
          ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    kw = dict(traditional=False, base=10000.0, scale=1.0)
    for _ in range(2):  # the second call is traced
        tuned.rope(x, 64, offset=1, **kw)
    with pytest.raises(ValueError) as builtin:
        mx.fast.rope(x, 64, offset=True, **kw)
    for _ in range(2):
        with pytest.raises(ValueError) as ours:
            mx.eval(tuned.rope(x, 64, offset=True, **kw))
        assert str(ours.value) == str(builtin.value)


@pytest.fixture
def some_shape_served(monkeypatch):
    """As if a stored variant beat the built-in at some other shape: calls are decided per
    signature (no op-wide direct path)."""
    monkeypatch.setattr(runtime.Dispatch, "_direct_path", lambda self, *call: None)


def test_a_remembered_fallback_is_counted_once_and_then_is_the_builtin_itself(rng, resolves, some_shape_served):
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    for _ in range(5):
        _same(tuned.softmax(x, axis=-1), mx.softmax(x, axis=-1))
    assert resolves == ["softmax"] and sum(tuned.fallbacks().values()) == 1
    (plan,) = tuned.softmax.plans.values()
    assert plan is mx.softmax  # no wrapper between a fallback and the built-in after its first call
    w = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    g = mx.grad(lambda x: (tuned.softmax(x, axis=-1) * w).sum())(x)  # the settled plan under mx.grad
    _same(g, mx.grad(lambda x: (mx.softmax(x, axis=-1) * w).sum())(x))
    _same(mx.compile(lambda x: tuned.softmax(x, axis=-1) * 2)(x), mx.softmax(x, axis=-1) * 2)  # and mx.compile
    assert sum(tuned.fallbacks().values()) == 1
    tuned.softmax(x[:2], axis=-1)  # another signature: another decision, counted
    assert sum(tuned.fallbacks().values()) == 2
    tuned.refresh()
    assert tuned.fallbacks() == {} and not tuned.softmax.plans and not tuned.softmax.fallbacks
    tuned.softmax(x, axis=-1)
    assert sum(tuned.fallbacks().values()) == 1


def test_a_call_that_cannot_be_remembered_is_counted_every_time(rng, resolves):
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    for _ in range(3):
        _same(tuned.softmax(x, axis=[-1]), mx.softmax(x, axis=[-1]))  # a list: unhashable
    assert resolves == ["softmax"] * 3 and sum(tuned.fallbacks().values()) == 3 and not tuned.softmax.plans


def test_the_inline_signature_is_the_signature(rng):
    """`tuned.<op>` builds a call's key inline, not through `signature`: it must be the
    same key, with and without keywords, and a value must never pass for an array."""
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    w = mx.ones((16,))
    for args, kwargs in [((x, w, 1e-5), {}), ((x, w), dict(eps=1e-5)), ((), dict(x=x, weight=w, eps=1e-5))]:
        tuned.refresh()
        tuned.rms_norm(*args, **kwargs)
        assert list(tuned.rms_norm.plans) == [runtime.signature(args, kwargs, ())]
        d = runtime.Dispatch("rms_norm", mx.fast.rms_norm)  # the object calls as its function does
        _same(d(*args, **kwargs), mx.fast.rms_norm(x, w, 1e-5))
        assert list(d.plans) == list(tuned.rms_norm.plans) and d.function.plans is d.plans
    assert runtime.signature((x, 3), {}) != runtime.signature(((x.shape, x.dtype), 3), {})
    assert runtime.signature((x,), {}) != runtime.signature((x.astype(mx.float16),), {})
    dtypes = [v for v in vars(mx).values() if isinstance(v, mx.Dtype)]
    assert len({runtime._DKEY(d) for d in dtypes}) == len(dtypes) > 10  # every dtype told apart
    assert runtime.signature((x,), dict(offset=3), ("offset",)) == runtime.signature((x,), dict(offset=4), ("offset",))


def test_strict_mode_after_a_lenient_block_refuses_fallbacks_settled_in_it(monkeypatch, rng):
    """A fallback decided inside `lenient` became the built-in itself; leaving the block with
    HLH_MLX_STRICT=1 must make it an error again, for free calls and for layers alike."""
    from hlh_mlx import nn as hnn
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    layer = hnn.RMSNorm(16)
    layer.eval()
    with tuned.lenient():
        for _ in range(2):
            tuned.softmax(x, axis=-1)
            layer(x)
        assert tuned.softmax.plans[runtime.signature((x,), {"axis": -1})] is mx.softmax
        assert layer._hlh_plan[5] is mx.fast.rms_norm
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x, axis=-1)
    with pytest.raises(tuned.FallbackError):
        layer(x)
    with tuned.lenient():  # and lenient again, as often as asked
        _same(tuned.softmax(x, axis=-1), mx.softmax(x, axis=-1))
        _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert sum(tuned.fallbacks().values()) == 2  # two distinct calls, each counted once


def test_strict_mode_refuses_a_layers_remembered_fallback(monkeypatch, rng):
    from hlh_mlx import nn as hnn
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    layer = hnn.RMSNorm(16)
    layer.eval()
    layer(x)
    layer(x)
    assert layer._hlh_plan[5] is mx.fast.rms_norm
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()
    with pytest.raises(tuned.FallbackError):
        layer(x)
    monkeypatch.delenv("HLH_MLX_STRICT")
    config.reset()
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert sum(tuned.fallbacks().values()) == 1


def test_a_lenient_block_without_strict_mode_keeps_plans_remembered_outside(rng):
    """Leaving `lenient` with strict mode off changes nothing: compiled blocks and layers
    keep what they remembered (no new generation)."""
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    tuned.softmax(x, axis=-1)
    before = runtime.generation[0]
    with tuned.lenient():
        tuned.softmax(x, axis=-1)
    assert runtime.generation[0] == before
    assert tuned.softmax.plans[runtime.signature((x,), {"axis": -1})] is mx.softmax


def test_forgetting_plans_at_the_bound_forgets_their_fallbacks(monkeypatch, rng):
    monkeypatch.setattr(runtime, "MAX_PLANS", 2)
    for n in range(1, 6):
        tuned.softmax(mx.zeros((n, 16)), axis=-1)
    assert len(tuned.softmax.plans) <= 2 and set(tuned.softmax.fallbacks) <= set(tuned.softmax.plans)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()  # puts back only the fallbacks still remembered
    assert len(tuned.softmax.plans) <= 2
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(mx.zeros((5, 16)), axis=-1)


# -- mx.compile and mx.grad -----------------------------------------------------------

class _GraphKernel:
    """Stands in for a compiled GPU kernel: an MLX graph, so mx.compile can trace it (the
    emulator computes eagerly on the host and cannot be traced)."""

    def __init__(self, variant, backend):
        pass

    def launcher(self, shape, dtype, out_shapes, out_dtypes):
        return lambda x, w, eps: [(x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w)
                                  .reshape(out_shapes[0])]


def test_a_compiled_plan_replays_matches_and_differentiates(store_dir, rng, monkeypatch, resolves):
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))
    monkeypatch.setattr(backends, "Kernel", _GraphKernel)
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((2, 4, 512)).astype(np.float32))
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    ref = mx.fast.rms_norm(x, w, 1e-5)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(tuned.rms_norm(x, w, 1e-5)), np.asarray(ref), rtol=1e-6)
    f = mx.compile(lambda x, w: tuned.rms_norm(x, w, 1e-5) * 2)
    np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(ref * 2), rtol=1e-6)
    g = mx.grad(lambda x, w: tuned.rms_norm(x, w, 1e-5).sum(), argnums=(0, 1))(x, w)
    g_ref = mx.grad(lambda x, w: mx.fast.rms_norm(x, w, 1e-5).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert tuned.fallbacks() == {} and resolves == ["rms_norm"]


def test_on_the_emulator_a_users_compiled_function_runs_the_builtin_visibly(store_dir, rng):
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    f = mx.compile(lambda x, w: tuned.rms_norm(x, w, 1e-5))
    np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(mx.fast.rms_norm(x, w, 1e-5)), rtol=1e-6)
    assert any("inside mx.compile" in why for _, why in tuned.fallbacks())


# -- what the built-in accepts, the tuned call accepts and answers identically --------

def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_empty_and_0d_inputs_answer_as_the_builtin():
    _same(tuned.softmax(mx.zeros((0, 4)), axis=-1), mx.softmax(mx.zeros((0, 4)), axis=-1))
    _same(tuned.softmax(mx.array(1.5)), mx.softmax(mx.array(1.5)))
    _same(tuned.rms_norm(mx.zeros((0, 8)), mx.ones((8,)), 1e-5), mx.fast.rms_norm(mx.zeros((0, 8)), mx.ones((8,)), 1e-5))


def test_softmax_defaults_to_every_axis_as_mlx_does(rng):
    x = mx.array(rng.standard_normal((3, 5)).astype(np.float32))
    _same(tuned.softmax(x), mx.softmax(x))


def test_odd_rope_dims_raise_what_mlx_raises():
    x = mx.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="dims must be even"):
        tuned.rope(x, 3, traditional=False, base=1e4, scale=1.0, offset=0)


def test_lists_raise_what_mlx_raises():
    with pytest.raises(TypeError, match="incompatible function arguments"):
        tuned.softmax([1.0, 2.0], axis=-1)


def test_transposed_broadcast_and_sliced_inputs_run_the_variant_correctly(store_dir, rng):
    v = variant("rms_norm", "rows")
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", v, ms=0.5, base_ms=1.0)
    base = mx.array(rng.standard_normal((512, 8)).astype(np.float32))
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    for x in (base.T, mx.broadcast_to(base[:1, :].T[:1], (8, 512)) + 0 * base.T, base.T[::2, :],
              mx.broadcast_to(mx.array(rng.standard_normal(512).astype(np.float32)), (8, 512))):
        _same(tuned.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
    assert tuned.fallbacks() == {}


def test_strict_mode_still_refuses_a_remembered_fallback(monkeypatch, rng):
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    tuned.softmax(x, axis=-1)
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x, axis=-1)
    with tuned.lenient():
        tuned.softmax(x, axis=-1)


@pytest.mark.parametrize("name", ["rope", "decode_attention"])
def test_the_builtin_timed_at_a_shape_computes_the_builtin(name, rng):
    """The sweep times `baseline_for(shape)` (static arguments bound once, as a program
    calls it); it must be the same computation as the op's built-in on those inputs."""
    from hlh_mlx import ops
    op = ops.get(name)
    shape = op.emulator_shapes[0]
    xs = op.make_inputs(shape, mx.float32, rng)
    np.testing.assert_allclose(np.asarray(op.baseline_for(shape)(*xs)[0]), np.asarray(op.baseline(*xs)[0]),
                               rtol=1e-6, atol=1e-6)


def test_layers_in_eval_mode_take_the_path_without_a_vjp(store_dir, rng):
    """Inference (mlx-lm loads models in eval mode) skips the custom function's graph node;
    training mode keeps the built-in's gradient."""
    from hlh_mlx import nn as hnn
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    layer = hnn.RMSNorm(512)
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    layer.eval()
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert tuned.rms_norm.no_grad.plans and not tuned.rms_norm.plans
    layer.train()
    g = mx.grad(lambda x: layer(x).sum())(x)
    _same(g, mx.grad(lambda x: mx.fast.rms_norm(x, layer.weight, layer.eps).sum())(x))
    assert tuned.rms_norm.plans and tuned.fallbacks() == {}


def test_any_op_is_callable_by_name_from_its_spec(rng, monkeypatch):
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    _same(tuned.call("softmax", x, axis=-1), mx.softmax(x, axis=-1))
    assert tuned.rms_norm is tuned.dispatch("rms_norm") and tuned.qgemv is tuned.quantized_matmul
    from hlh_mlx import ops
    from dataclasses import replace
    bare = replace(ops.get("gelu"), name="bare", function=None)
    monkeypatch.setattr(ops, "get", lambda name, _get=ops.get: bare if name == "bare" else _get(name))
    with pytest.raises(ValueError, match=r"op 'bare' has no `function` and `bind` in its spec \(hlh_mlx/ops/bare.py\)"):
        tuned.call("bare", x)


def test_a_layer_remembers_its_plan_until_weights_settings_or_results_change(store_dir, rng, resolves,
                                                                             some_shape_served):
    from hlh_mlx import nn as hnn
    layer = hnn.RMSNorm(512)
    layer.eval()
    for _ in range(3):
        x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
        _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert resolves == ["rms_norm"] and sum(tuned.fallbacks().values()) == 1  # decided once, counted once
    assert layer._hlh_plan[5] is mx.fast.rms_norm  # the layer's plan is the built-in itself
    layer.weight = layer.weight * 2            # a new weight array: the layer's plan is looked up again
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    layer.eps = 1e-6                            # another setting: decided again
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, 1e-6))
    assert resolves == ["rms_norm"] * 2
    layer.eps = 1e-5
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    tuned.refresh()                             # new results (a sweep in this process): the layer sees them
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert tuned.fallbacks() == {} and "rms_norm" not in layer.parameters().get("_hlh_plan", "")


def test_expected_us_is_what_the_call_would_cost_from_the_store(store_dir, rng):
    """A fused op is weighed against the separate calls it replaces by these figures: the
    chosen variant's chain latency + host time, else the built-in's at exactly this shape,
    else None (never a guess)."""
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    assert runtime.expected_us("softmax", x, axis=-1) is None  # nothing timed
    v = variant("softmax", "rows")
    write(store_dir, "softmax", {"R": 8, "C": 512}, "float32", v, ms=0.020, base_ms=0.050,
          host_us=2.0, base_host_us=1.0)
    tuned.refresh()
    assert runtime.expected_us("softmax", x, axis=-1) == pytest.approx(22.0)  # the variant runs
    write(store_dir, "softmax", {"R": 64, "C": 512}, "float32", v, ms=0.060, base_ms=0.030,
          host_us=2.0, base_host_us=1.0)
    tuned.refresh()
    x64 = mx.array(rng.standard_normal((64, 512)).astype(np.float32))
    # the variant lost at 64x512 (and the 8x512 winner is too far away to serve it): the
    # built-in runs, and its own figure at exactly this shape is used
    assert not runtime.serves("softmax", x64, axis=-1)
    assert runtime.expected_us("softmax", x64, axis=-1) == pytest.approx(31.0)
    assert runtime.expected_us("softmax", mx.zeros((3, 7)), axis=-1) is None


def test_an_op_no_variant_serves_anywhere_runs_the_builtin_with_no_signature(monkeypatch, rng, resolves):
    """No stored variant of the op beats the built-in at any shape here: after the first
    call (decided and counted) every call is the built-in, with no signature built; strict
    mode, a `lenient` block (what `tune` records in) and refresh() each end that."""
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    be = runtime.backend()
    assert select.never_chosen("softmax", backends.device(be).slug, be)  # nothing stored here
    for y in (x, x[:2], x[:1, :5], x.astype(mx.float16)):
        _same(tuned.softmax(y, axis=-1), mx.softmax(y, axis=-1))
    assert resolves == ["softmax"] and sum(tuned.fallbacks().values()) == 1 and len(tuned.softmax.plans) == 1
    assert tuned.softmax.dispatch._direct is mx.softmax
    with tuned.lenient():  # recording a program's calls: each distinct one is decided
        tuned.refresh()
        tuned.softmax(x, axis=-1)
        tuned.softmax(x[:2], axis=-1)
    assert resolves == ["softmax"] * 3 and tuned.softmax.dispatch._direct is mx.softmax  # resumed after
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    tuned.refresh()
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x, axis=-1)
    assert tuned.softmax.dispatch._direct is None
    monkeypatch.delenv("HLH_MLX_STRICT")
    config.reset()
    tuned.softmax(x, axis=-1)  # decided under strict mode: its remembered plan now settles
    assert tuned.softmax.dispatch._direct is None
    tuned.softmax(x[:2], axis=-1)  # the next decision finds strict mode off
    assert tuned.softmax.dispatch._direct is mx.softmax
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()  # strict mode on again: the direct path ends, the next call raises
    assert tuned.softmax.dispatch._direct is None
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x[:2], axis=-1)


def test_a_layer_of_an_op_no_variant_serves_calls_the_builtin_directly(rng, resolves):
    from hlh_mlx import nn as hnn
    layer = hnn.RMSNorm(512)
    layer.eval()
    for rows in (8, 4, 1):
        x = mx.array(rng.standard_normal((rows, 512)).astype(np.float32))
        _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert resolves == ["rms_norm"] and tuned.rms_norm.no_grad.dispatch._direct is mx.fast.rms_norm


@pytest.mark.parametrize("block", ["lenient", "recording"])
def test_a_lenient_or_recording_block_decides_every_call_then_the_direct_path_resumes(rng, resolves, block):
    """Entering either block ends an op's direct path (`tune` records in lenient, validate's
    warm-up in recording: every distinct call must be decided there); leaving it, ops no
    variant serves go direct again, though their calls now find remembered plans."""
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    tuned.softmax(x, axis=-1)
    assert tuned.softmax.dispatch._direct is mx.softmax
    with getattr(tuned, block)():
        assert tuned.softmax.dispatch._direct is None
        tuned.softmax(x[:2], axis=-1)
        tuned.softmax(x.astype(mx.float16), axis=-1)
    assert resolves == ["softmax"] * 3 and len(runtime.decided_calls()) == 3
    assert tuned.softmax.dispatch._direct is mx.softmax


# -- the traced path: an op's calls through its own compiled function -----------------

@pytest.fixture
def traced(monkeypatch):
    """As on a GPU back end: the emulator's calls go through each op's compiled function
    after its first (kernels stand in as MLX graphs where a test stores a variant)."""
    monkeypatch.setattr(backends, "COMPILABLE", frozenset({"emulator"}))


def test_traced_calls_replay_with_no_decision_in_python(store_dir, rng, monkeypatch, traced, resolves):
    monkeypatch.setattr(backends, "Kernel", _GraphKernel)
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    w = mx.array(rng.standard_normal(512).astype(np.float32))
    d = tuned.rms_norm.dispatch
    for _ in range(5):
        x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))  # new values each call
        _same(tuned.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
    assert d._traced is not None and d._traces == 1  # the second call traced, the rest replayed
    _same(tuned.rms_norm(x[:4], w, eps=1e-5), mx.fast.rms_norm(x[:4], w, 1e-5))  # another shape, a keyword
    _same(tuned.rms_norm(x[:4], w, eps=1e-5), mx.fast.rms_norm(x[:4], w, 1e-5))
    assert d._traces == 2 and resolves == ["rms_norm"] * 2 and tuned.fallbacks() == {}
    tuned.refresh()
    assert d._traced is None


def test_traced_rope_takes_every_offset_as_data(rng, traced, resolves, some_shape_served):
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    d = tuned.rope.dispatch
    for offset in range(12):
        kw = dict(traditional=False, base=10000.0, scale=1.0, offset=offset)
        _same(tuned.rope(x, 64, **kw), mx.fast.rope(x, 64, **kw))
    assert d._traces == 1 and resolves == ["rope"] and sum(tuned.fallbacks().values()) == 1
    # tuned.rope has mx.fast.rope's own signature: keywords in another order are the same call
    for offset in (3, 4):
        _same(tuned.rope(x, 64, offset=offset, scale=1.0, base=10000.0, traditional=False),
              mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=offset))
    assert d._traces == 1
    # through the generic entry (any op's) they are another keyword set, answered alike
    for offset in (3, 4):
        _same(d.function(x, 64, offset=offset, scale=1.0, base=10000.0, traditional=False),
              mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=offset))
    assert d._traces == 2
    # an offset the conversion refuses stays a value: the built-in answers it
    for offset in (-3, -3, 2 ** 25):
        kw = dict(traditional=False, base=10000.0, scale=1.0, offset=offset)
        _same(tuned.rope(x, 64, **kw), mx.fast.rope(x, 64, **kw))


def test_keyword_entries_take_the_compiled_function_with_their_keywords_as_given(rng, traced, resolves,
                                                                                 some_shape_served):
    """tuned.rope and tuned.quantized_matmul have their built-ins' signatures (no dictionary
    of keywords built per call): after the first call every call with the keywords is a
    replay of the op's compiled function, in any keyword order; whatever else (a keyword left
    out, an unknown one, a stream, an extra positional) takes the generic entry and answers
    as the built-in does, its own error included."""
    x = mx.array(rng.standard_normal((1, 4, 1, 64)).astype(np.float32))
    kw = dict(traditional=False, base=10000.0, scale=1.0)
    d = tuned.rope.dispatch
    for offset in range(6):
        _same(tuned.rope(x, 64, offset=offset, **kw), mx.fast.rope(x, 64, offset=offset, **kw))
    assert d._traces == 1 and resolves == ["rope"]
    with pytest.raises(TypeError) as builtin:
        mx.fast.rope(x, 64, traditional=False, base=10000.0, offset=2)  # scale left out
    with pytest.raises(TypeError) as ours:
        tuned.rope(x, 64, traditional=False, base=10000.0, offset=2)
    assert str(ours.value) == str(builtin.value)
    with pytest.raises(TypeError) as builtin:
        mx.fast.rope(x, 64, **kw, offset=2, colour=1)
    with pytest.raises(TypeError) as ours:
        tuned.rope(x, 64, offset=2, colour=1, **kw)
    assert str(ours.value) == str(builtin.value)  # MLX's message, the keywords in the built-in's order
    _same(tuned.rope(x, 64, offset=2, stream=mx.cpu, **kw), mx.fast.rope(x, 64, offset=2, **kw))
    freqs = mx.array(np.geomspace(1.0, 1e4, 32).astype(np.float32))  # Llama 3's RoPE passes its own
    before = d._traces
    for offset in (1, 2):
        llama3 = dict(traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)
        _same(tuned.rope(x, 64, **llama3), mx.fast.rope(x, 64, **llama3))
    _same(tuned.rope(x, 64, offset=3, freqs=None, **kw), mx.fast.rope(x, 64, offset=3, freqs=None, **kw))
    assert d._traces == before + 1  # one for the calls with freqs, whatever their offset
    assert tuned.rope.no_grad.dispatch is d.no_grad and tuned.rope.no_grad is not tuned.rope
    _same(tuned.rope.no_grad(x, 64, offset=3, **kw), mx.fast.rope(x, 64, offset=3, **kw))

    w, scales, biases = mx.quantize(mx.array(rng.standard_normal((128, 256)).astype(np.float32)), group_size=64, bits=4)
    v = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    q = tuned.quantized_matmul.dispatch
    for _ in range(3):
        _same(tuned.quantized_matmul(v, w, scales, biases, bits=4, group_size=64, transpose=True),
              mx.quantized_matmul(v, w, scales, biases, transpose=True, group_size=64, bits=4))
    assert q._traces == 1 and resolves.count("qgemv") == 1
    for _ in range(3):  # hlh_mlx.nn.QuantizedLinear passes mode=: a keyword set of its own, replayed too
        _same(tuned.quantized_matmul.no_grad(v, w, scales, biases, transpose=True, group_size=64, bits=4, mode="affine"),
              mx.quantized_matmul(v, w, scales, biases, transpose=True, group_size=64, bits=4, mode="affine"))
    assert q.no_grad._traces == 1
    _same(tuned.quantized_matmul(v, w, scales, biases, True, 64, 4, "affine"),  # mode, positionally
          mx.quantized_matmul(v, w, scales, biases, True, 64, 4, "affine"))
    _same(tuned.quantized_matmul(v, w, scales, biases),  # MLX's defaults: the generic entry
          mx.quantized_matmul(v, w, scales, biases))


def test_traced_fallbacks_count_once_and_strict_mode_refuses_them(monkeypatch, rng, traced, resolves,
                                                                   some_shape_served):
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    for _ in range(4):
        _same(tuned.softmax(x, axis=-1), mx.softmax(x, axis=-1))
    assert sum(tuned.fallbacks().values()) == 1 and tuned.softmax.dispatch._traces == 1
    monkeypatch.setenv("HLH_MLX_STRICT", "1")
    config.reset()  # the traces ran the built-in unchecked: traced again, checked
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x, axis=-1)
    with pytest.raises(tuned.FallbackError):
        tuned.softmax(x[:2], axis=-1)
    with tuned.lenient():
        _same(tuned.softmax(x, axis=-1), mx.softmax(x, axis=-1))
    monkeypatch.delenv("HLH_MLX_STRICT")
    config.reset()
    for _ in range(2):
        _same(tuned.softmax(x[:2], axis=-1), mx.softmax(x[:2], axis=-1))
    assert sum(tuned.fallbacks().values()) == 2  # two distinct calls


def test_arguments_mlx_cannot_trace_take_the_python_path(rng, traced, some_shape_served):
    x = rng.standard_normal((3, 16)).astype(np.float32)
    for _ in range(3):
        with pytest.raises(TypeError, match="incompatible function arguments"):  # as mx.softmax does
            tuned.softmax(x, axis=-1)                                             # a numpy array
        _same(tuned.softmax(mx.array(x), axis=-1, stream=mx.cpu), mx.softmax(mx.array(x), axis=-1))  # a stream
    assert tuned.softmax.dispatch._traced is not None and tuned.softmax.plans  # decided in Python


def test_traced_bad_inputs_answer_or_raise_as_the_builtin(rng, traced, some_shape_served):
    for _ in range(3):  # the first call decides in Python; the later ones are traced
        _same(tuned.softmax(mx.zeros((0, 4)), axis=-1), mx.softmax(mx.zeros((0, 4)), axis=-1))
        _same(tuned.softmax(mx.array(1.5)), mx.softmax(mx.array(1.5)))
        with pytest.raises(ValueError, match="dims must be even"):
            tuned.rope(mx.zeros((1, 2, 3)), 3, traditional=False, base=1e4, scale=1.0, offset=0)
        with pytest.raises(TypeError, match="incompatible function arguments"):
            tuned.softmax([1.0, 2.0], axis=-1)
    assert tuned.softmax.dispatch._traced is not None and tuned.rope.dispatch._traced is not None


def test_an_op_that_keeps_tracing_goes_back_to_the_python_path(monkeypatch, rng, traced, some_shape_served):
    """MLX compares a call with each stored trace in turn, and a call whose shapes change
    every time pays a trace each: past MAX_TRACES distinct calls the op decides in Python,
    with its traces freed, until refresh(). Calls under mx.grad, which MLX traces every
    time, are not new calls: they leave the op's traces alone."""
    monkeypatch.setattr(runtime, "MAX_TRACES", 3)
    d = tuned.softmax.dispatch
    for n in range(1, 8):
        for _ in range(2):
            _same(tuned.softmax(mx.ones((n, 16)), axis=-1), mx.softmax(mx.ones((n, 16)), axis=-1))
    assert d._traced is None and d._untraced and len(tuned.softmax.plans) == 7
    tuned.refresh()
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    w = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    for _ in range(2):
        tuned.softmax(x, axis=-1)
    kept = d._traced
    for _ in range(6):  # under mx.grad MLX traces every call
        _same(mx.grad(lambda x: (tuned.softmax(x, axis=-1) * w).sum())(x),
              mx.grad(lambda x: (mx.softmax(x, axis=-1) * w).sum())(x))
    assert d._traced is kept and not d._untraced and d._traces > 3


def test_dispatched_passes_keywords_on_the_traced_path(traced):
    f = runtime.dispatched(lambda x, scale=1.0: x * scale)
    for _ in range(2):
        assert f(mx.ones((2,)), scale=3.0).tolist() == [3.0, 3.0]


def test_a_call_that_fails_to_trace_raises_what_the_builtin_raises(rng, traced, some_shape_served):
    x = mx.array(rng.standard_normal((1, 2, 1, 64)).astype(np.float32))
    kw = dict(traditional=False, base=1e4, scale=1.0, offset=0)
    tuned.rope(x, 64, **kw)
    with pytest.raises(TypeError) as builtin:
        mx.fast.rope(x, 2 ** 64, **kw)
    with pytest.raises(TypeError) as ours:  # MLX's trace key cannot hold the int: the Python path
        tuned.rope(x, 2 ** 64, **kw)
    assert str(ours.value) == str(builtin.value)


def test_offsets_made_in_one_thread_do_not_reach_another(rng, traced, some_shape_served):
    """The views of a step's offset are per thread: a graph node made in one thread cannot
    be evaluated by another thread's streams."""
    import threading
    x = mx.array(rng.standard_normal((1, 2, 1, 64)).astype(np.float32))
    kw = dict(traditional=False, base=1e4, scale=1.0)
    for _ in range(2):
        mx.eval(tuned.rope(x, 64, offset=6, **kw))
    mine = tuned.rope(x, 64, offset=7, **kw)  # made here, not evaluated yet
    out, errors = [], []

    def other():
        try:
            out.append(np.asarray(tuned.rope(x, 64, offset=7, **kw)))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors, errors
    np.testing.assert_allclose(out[0], np.asarray(mine), rtol=1e-6)
    _same(mine, mx.fast.rope(x, 64, offset=7, **kw))


def test_a_layer_goes_through_its_ops_compiled_function_where_kernels_replay(store_dir, rng, monkeypatch, traced,
                                                                             resolves):
    from hlh_mlx import nn as hnn
    monkeypatch.setattr(backends, "Kernel", _GraphKernel)
    write(store_dir, "rms_norm", {"R": 8, "C": 512}, "float32", variant("rms_norm", "rows"), ms=0.5, base_ms=1.0)
    layer = hnn.RMSNorm(512)
    layer.eval()
    for _ in range(4):
        x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
        _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    d = tuned.rms_norm.no_grad.dispatch
    assert d._traces == 1 and resolves == ["rms_norm"] and "_hlh_plan" not in layer.__dict__
    layer.weight = mx.array(rng.standard_normal(512).astype(np.float32))  # new weights: the same trace serves
    _same(layer(x), mx.fast.rms_norm(x, layer.weight, layer.eps))
    assert d._traces == 1 and tuned.fallbacks() == {}


def test_a_traced_builtin_gets_rope_offsets_it_broadcasts(rng, monkeypatch, traced, some_shape_served):
    """The traced path turns an int offset into data for both plans; the built-in gets it
    0-d (MLX's CUDA rope reads a (1,)-shaped offset per batch row)."""
    seen = []
    real = tuned.rope.dispatch.builtin

    def spy(x, dims, **kw):
        seen.append(getattr(kw["offset"], "ndim", "int"))
        return real(x, dims, **kw)
    monkeypatch.setattr(tuned.rope.dispatch, "builtin", spy)
    x = mx.array(rng.standard_normal((4, 2, 1, 64)).astype(np.float32))  # four sequences
    for offset in (5, 6, 7):
        kw = dict(traditional=False, base=10000.0, scale=1.0, offset=offset)
        _same(tuned.rope(x, 64, **kw), mx.fast.rope(x, 64, **kw))
    # the trace's decision builds the built-in's graph once (does it refuse these?), then its plan
    assert seen == [0, 0] and tuned.rope.dispatch._traces == 1


def test_a_traced_call_with_a_list_argument_is_traced_once(rng, traced, some_shape_served, resolves):
    """A list of ints is a constant MLX's trace key holds: the call is traced once and
    replayed (its plan, unhashable, is decided at the trace), not tried and failed each time."""
    x = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    for _ in range(4):
        _same(tuned.softmax(x, axis=[-1]), mx.softmax(x, axis=[-1]))
    assert tuned.softmax.dispatch._traces == 1 and resolves == ["softmax"]
