"""Real kernels on the emulator, checked against MLX's CPU ops on fresh random inputs."""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator


def close(a, b, tol):
    a = np.asarray(a.astype(mx.float32)) if isinstance(a, mx.array) else a
    b = np.asarray(b.astype(mx.float32)) if isinstance(b, mx.array) else b
    assert a.shape == b.shape
    assert np.all(np.isfinite(a)), "output has NaN/inf (an unwritten element?)"
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


STRIDED_COPY = """
    uint elem = thread_position_in_grid.x;
    int64_t loc = elem_to_loc<int64_t>(elem, inp_shape, inp_strides, inp_ndim);
    out[elem] = inp[loc] * T(2);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_strided_views_read_with_real_strides(rng, dtype):
    k = emulator.metal_kernel("strided", ["inp"], ["out"], STRIDED_COPY, ensure_row_contiguous=False)
    base = mx.array(rng.standard_normal((5, 7, 6)).astype(np.float32)).astype(dtype)
    for view in (base.transpose(2, 0, 1), base[:, ::2, 1:], base[::-1, :, ::-3]):
        (y,) = k(inputs=[view], template=[("T", dtype)], grid=(view.size, 1, 1), threadgroup=(32, 1, 1),
                 output_shapes=[(view.size,)], output_dtypes=[dtype])
        close(y, (view * 2).reshape(-1), 0)


SOFTMAX = """
    // one threadgroup per row: simd reductions, then across simdgroups in threadgroup memory
    threadgroup float partial[32];
    uint row = threadgroup_position_in_grid.y;
    uint tid = thread_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
    uint nsg = simdgroups_per_threadgroup;
    int n = inp_shape[1];
    const device T* x = inp + row * n;
    float m = -INFINITY;
    for (int i = tid; i < n; i += threads_per_threadgroup.x) m = max(m, float(x[i]));
    m = simd_max(m);
    if (lane == 0) partial[sg] = m;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    m = partial[0];
    for (uint s = 1; s < nsg; s++) m = max(m, partial[s]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float sum = 0;
    for (int i = tid; i < n; i += threads_per_threadgroup.x) sum += exp(float(x[i]) - m);
    sum = simd_sum(sum);
    if (lane == 0) partial[sg] = sum;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    sum = 0;
    for (uint s = 0; s < nsg; s++) sum += partial[s];
    for (int i = tid; i < n; i += threads_per_threadgroup.x) out[row * n + i] = T(exp(float(x[i]) - m) / sum);
"""


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 2e-3)])
@pytest.mark.parametrize("tg", [32, 96, 256])
def test_row_softmax_simd_and_threadgroup_reductions(rng, dtype, tol, tg):
    k = emulator.metal_kernel("softmax", ["inp"], ["out"], SOFTMAX.replace("INFINITY", "INFINITY_F"),
                              header="constant float INFINITY_F = 1.0f / 0.0f;", sanitize=True)
    x = mx.array(rng.standard_normal((7, 333)).astype(np.float32) * 3).astype(dtype)
    (y,) = k(inputs=[x], template=[("T", dtype)], grid=(tg, 7, 1), threadgroup=(tg, 1, 1),
             output_shapes=[x.shape], output_dtypes=[dtype])
    close(y, mx.softmax(x.astype(mx.float32), axis=-1), tol)


SCATTER_ADD = """
    uint i = thread_position_in_grid.x;
    atomic_fetch_add_explicit(&out[idx[i]], float(val[i]), memory_order_relaxed);
"""


def test_atomic_scatter_add_with_init_value(rng):
    k = emulator.metal_kernel("scatter", ["idx", "val"], ["out"], SCATTER_ADD, atomic_outputs=True)
    n, m = 5000, 37
    idx = mx.array(rng.integers(0, m, n).astype(np.int32))
    val = mx.array(rng.standard_normal(n).astype(np.float32))
    (y,) = k(inputs=[idx, val], grid=(n, 1, 1), threadgroup=(128, 1, 1), output_shapes=[(m,)],
             output_dtypes=[mx.float32], init_value=1.5)
    ref = np.full(m, 1.5, np.float64)
    np.add.at(ref, np.asarray(idx), np.asarray(val).astype(np.float64))
    close(y, ref.astype(np.float32), 1e-4)


SIMDGROUP_MATMUL = """
    // one simdgroup computes one 8x8 tile of C = A @ B
    uint2 tile = uint2(threadgroup_position_in_grid.x, threadgroup_position_in_grid.y);
    uint K = a_shape[1], N = b_shape[1];
    simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_matrix<T, 8, 8> ma, mb;
    for (uint k = 0; k < K; k += 8) {
        simdgroup_load(ma, a, K, ulong2(k, tile.y * 8));
        simdgroup_load(mb, b, N, ulong2(tile.x * 8, k));
        simdgroup_multiply_accumulate(acc, ma, mb, acc);
    }
    simdgroup_store(acc, c, N, ulong2(tile.x * 8, tile.y * 8));
"""


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 1e-2)])
def test_simdgroup_matrix_matmul(rng, dtype, tol):
    k = emulator.metal_kernel("sgmm", ["a", "b"], ["c"], SIMDGROUP_MATMUL)
    M, K, N = 24, 32, 16
    a = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((K, N)).astype(np.float32)).astype(dtype)
    (c,) = k(inputs=[a, b], template=[("T", dtype)], grid=(N // 8 * 32, M // 8, 1), threadgroup=(32, 1, 1),
             output_shapes=[(M, N)], output_dtypes=[mx.float32])
    close(c, a.astype(mx.float32) @ b.astype(mx.float32), tol)


def test_simdgroup_matrix_thread_elements_follow_apple_layout():
    src = """
        simdgroup_matrix<float, 8, 8> m;
        simdgroup_load(m, inp);
        uint l = thread_index_in_simdgroup;
        out[2 * l] = m.thread_elements()[0];
        out[2 * l + 1] = m.thread_elements()[1];
    """
    k = emulator.metal_kernel("layout", ["inp"], ["out"], src)
    (y,) = k(inputs=[mx.arange(64, dtype=mx.float32)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
             output_shapes=[(64,)], output_dtypes=[mx.float32])
    y = np.asarray(y).reshape(32, 2)
    for lane in range(32):
        qid = lane // 4
        row = (qid & 4) + (lane // 2) % 4
        col = (qid & 2) * 2 + (lane % 2) * 2
        assert list(y[lane]) == [row * 8 + col, row * 8 + col + 1]


TILED_MATMUL = """
    threadgroup T As[BS][BS];
    threadgroup T Bs[BS][BS + 1];
    uint M = a_shape[0], K = a_shape[1], N = b_shape[1];
    uint tx = thread_position_in_threadgroup.x, ty = thread_position_in_threadgroup.y;
    uint row = threadgroup_position_in_grid.y * BS + ty;
    uint col = threadgroup_position_in_grid.x * BS + tx;
    float acc = 0.0f;
    for (uint k0 = 0; k0 < K; k0 += BS) {
        As[ty][tx] = (row < M && k0 + tx < K) ? a[row * K + k0 + tx] : T(0);
        Bs[ty][tx] = (k0 + ty < K && col < N) ? b[(k0 + ty) * N + col] : T(0);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < BS; k++) acc += float(As[ty][k]) * float(Bs[k][tx]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (row < M && col < N) c[row * N + col] = T(acc);
"""


def tiled_grid(M, N, bs):
    return ((N + bs - 1) // bs * bs, (M + bs - 1) // bs * bs, 1)


@pytest.mark.parametrize("M,K,N", [(33, 47, 21), (1, 5, 70), (64, 64, 64)])
def test_tiled_half_matmul_non_multiple_sizes(rng, M, K, N):
    k = emulator.metal_kernel("tiled", ["a", "b"], ["c"], TILED_MATMUL)
    a = mx.array(rng.standard_normal((M, K)).astype(np.float16))
    b = mx.array(rng.standard_normal((K, N)).astype(np.float16))
    (c,) = k(inputs=[a, b], template=[("T", mx.float16), ("BS", 16)], grid=tiled_grid(M, N, 16),
             threadgroup=(16, 16, 1), output_shapes=[(M, N)], output_dtypes=[mx.float16])
    close(c, (a.astype(mx.float32) @ b.astype(mx.float32)), 3e-2)


def test_partial_threadgroups_lack_the_missing_threads():
    src = """
        uint3 g = thread_position_in_grid;
        uint i = g.y * threads_per_grid.x + g.x;
        out[i] = float(threads_per_threadgroup.x * 1000 + threads_per_threadgroup.y) + 0.5f * float(thread_index_in_threadgroup == 0);
        cnt[i] = dispatch_threads_per_threadgroup.x;
    """
    k = emulator.metal_kernel("partial", [], ["out", "cnt"], src)
    out, cnt = k(inputs=[], grid=(10, 5, 1), threadgroup=(4, 3, 1), output_shapes=[(5, 10), (5, 10)],
                 output_dtypes=[mx.float32, mx.uint32])
    out = np.asarray(out)
    for y in range(5):
        for x in range(10):
            w = min(4, 10 - x // 4 * 4)
            h = min(3, 5 - y // 3 * 3)
            first = 0.5 if (x % 4 == 0 and y % 3 == 0) else 0.0
            assert out[y, x] == w * 1000 + h + first
    assert np.all(np.asarray(cnt) == 4)


def test_threadgroup_is_clamped_to_the_grid():
    k = emulator.metal_kernel("clamp", [], ["out"], "out[thread_position_in_grid.x] = threads_per_threadgroup.x;")
    (y,) = k(inputs=[], grid=(5, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(5,)], output_dtypes=[mx.uint32])
    assert np.asarray(y).tolist() == [5] * 5


def test_divergent_simd_sum_counts_only_active_lanes():
    src = """
        uint l = thread_index_in_simdgroup;
        float v = 1.0f;
        if (l < 10) out[l] = simd_sum(v);        // 10 active lanes
        else out[l] = simd_sum(v * 2.0f) + 100;  // 22 active lanes, another call
    """
    k = emulator.metal_kernel("diverge", [], ["out"], src)
    (y,) = k(inputs=[], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)], output_dtypes=[mx.float32])
    assert np.asarray(y).tolist() == [10.0] * 10 + [144.0] * 22


def test_simd_shuffles_scans_votes_and_quads(rng):
    src = """
        uint l = thread_index_in_simdgroup;
        uint i = thread_position_in_grid.x;
        float x = inp[i];
        out[i * 8 + 0] = simd_shuffle_down(x, 3);
        out[i * 8 + 1] = simd_shuffle_xor(x, 5);
        out[i * 8 + 2] = simd_prefix_inclusive_sum(x);
        out[i * 8 + 3] = simd_prefix_exclusive_sum(x);
        out[i * 8 + 4] = simd_broadcast(x, 7);
        out[i * 8 + 5] = quad_sum(x);
        out[i * 8 + 6] = float(simd_ballot(x > 0.0f).any()) + 2.0f * float(simd_all(x > -100.0f));
        out[i * 8 + 7] = quad_shuffle_up(x, 1);
    """
    k = emulator.metal_kernel("shuffles", ["inp"], ["out"], src)
    x = rng.standard_normal(64).astype(np.float32)
    (y,) = k(inputs=[mx.array(x)], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64 * 8,)],
             output_dtypes=[mx.float32])
    y = np.asarray(y).reshape(64, 8)
    for i in range(64):
        l, base, q = i % 32, i - i % 32, i - i % 4
        assert y[i, 0] == (x[i + 3] if l + 3 < 32 else x[i])
        assert y[i, 1] == x[base + (l ^ 5)]
        assert np.isclose(y[i, 2], x[base:i + 1].sum(), atol=1e-5)
        assert np.isclose(y[i, 3], x[base:i].sum(), atol=1e-5)
        assert y[i, 4] == x[base + 7]
        assert np.isclose(y[i, 5], x[q:q + 4].sum(), atol=1e-5)
        assert y[i, 6] == 1.0 * (x[base:base + 32] > 0).any() + 2.0
        assert y[i, 7] == (x[i - 1] if i % 4 else x[i])


def test_vectors_swizzles_and_math(rng):
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3]);
        float4 w = v.wzyx * 2.0f + float4(v.xy, 1.0f, 0.0f);
        w.xy += v.zw;
        half3 h = half3(w.xyz);
        float3 f = float3(h) + sign(v.xyz) * fast::exp(-abs(v.xyz));
        out[4 * i] = f.x; out[4 * i + 1] = f.y; out[4 * i + 2] = f.z;
        out[4 * i + 3] = dot(v, w) + select(0.0f, 1.0f, all(v.xy == v.xy)) + float(sizeof(float3));
    """
    k = emulator.metal_kernel("vecs", ["inp"], ["out"], src)
    x = rng.standard_normal(32).astype(np.float32)
    (y,) = k(inputs=[mx.array(x)], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(32,)],
             output_dtypes=[mx.float32])
    v = x.reshape(8, 4)
    # float32 throughout, as the kernel computes: w rounded to half from a float64 w
    # can land one half-ulp away when w sits near a rounding boundary.
    w = v[:, ::-1] * 2 + np.stack([v[:, 0], v[:, 1], np.ones(8, np.float32), np.zeros(8, np.float32)], 1)
    assert w.dtype == np.float32
    w[:, 0:2] += v[:, 2:4]
    f = w[:, :3].astype(np.float16).astype(np.float32) + np.sign(v[:, :3]) * np.exp(-np.abs(v[:, :3]))
    ref = np.concatenate([f, (np.sum(v * w, 1) + 1 + 16)[:, None]], 1)
    np.testing.assert_allclose(np.asarray(y).reshape(8, 4), ref, rtol=1e-5, atol=1e-5)


def test_header_helpers_and_templates(rng):
    header = """
    template <typename U> U twice(U x) { return x + x; }
    METAL_FUNC float axpy(float a, float x, float y) { return fma(a, x, y); }
    """
    src = "uint i = thread_position_in_grid.x; out[i] = T(axpy(A, float(twice(inp[i])), 1.0f));"
    k = emulator.metal_kernel("helpers", ["inp"], ["out"], src, header=header)
    x = mx.array(rng.standard_normal(100).astype(np.float32)).astype(mx.bfloat16)
    (y,) = k(inputs=[x], template=[("T", mx.bfloat16), ("A", 3)], grid=(100, 1, 1), threadgroup=(64, 1, 1),
             output_shapes=[(100,)], output_dtypes=[mx.bfloat16])
    close(y, (3 * 2 * x.astype(mx.float32) + 1).astype(mx.bfloat16), 0)


def test_scalar_and_small_inputs_and_ndim():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = s * small[i % 3] + float(big_ndim) + float(big_shape[1]);
    """
    k = emulator.metal_kernel("small", ["s", "small", "big"], ["out"], src)
    big = mx.zeros((2, 9))
    (y,) = k(inputs=[mx.array(2.0), mx.array([1.0, 2.0, 3.0]), big], grid=(6, 1, 1), threadgroup=(6, 1, 1),
             output_shapes=[(6,)], output_dtypes=[mx.float32])
    assert np.asarray(y).tolist() == [2 + 2 + 9.0, 4 + 11.0, 6 + 11.0, 2 + 11.0, 4 + 11.0, 6 + 11.0]


def test_verbose_prints_mlx_style_signature(capsys):
    src = "// uses a_shape in a comment\nuint i = thread_position_in_grid.x; out[i] = a[i] + s;"
    k = emulator.metal_kernel("vb", ["a", "s"], ["out"], src)
    k(inputs=[mx.ones((10,)), mx.array(1.0)], grid=(10, 1, 1), threadgroup=(10, 1, 1), output_shapes=[(10,)],
      output_dtypes=[mx.float32], template=[("T", mx.float16), ("B", True)], verbose=True)
    text = capsys.readouterr().out
    assert "template <typename T, bool B>" in text
    assert "[[kernel]] void custom_kernel_vb_float16_t_1_float_floats_float(" in text
    assert "const device float* a [[buffer(0)]]" in text
    assert "const constant int* a_shape [[buffer(1)]]" in text  # substring match, comments count
    assert "const constant float& s [[buffer(2)]]" in text
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in text


VEC4_AFTER_ODD = """
    uint i = thread_position_in_grid.x;
    vec<float, 4> v = *(const device vec<float, 4>*)(b + 4 * i);
    *(device vec<float, 4>*)(out + 4 * i) = v * 2.0f + a[0];
"""


@pytest.mark.parametrize("sanitize", [False, True])
def test_vector_loads_from_a_buffer_after_an_odd_sized_one(rng, sanitize):
    """Metal buffers are aligned; so are the emulator's with and without the sanitizer (a
    vec<float, 4> load from a buffer laid out after a 3-float one crashed unsanitized)."""
    k = emulator.metal_kernel("vec4", ["a", "b"], ["out"], VEC4_AFTER_ODD, sanitize=sanitize)
    a = mx.array(rng.standard_normal(3).astype(np.float32))
    b = mx.array(rng.standard_normal(64).astype(np.float32))
    (y,) = k(inputs=[a, b], grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(64,)],
             output_dtypes=[mx.float32])
    close(y, b * 2 + a[0], 1e-6)
