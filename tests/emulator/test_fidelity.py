"""Real-world Metal kernel text passes, and means what it means on a Mac.

The kernels below follow, feature for feature, what public MLX kernel code passes to
`mx.fast.metal_kernel` (written for these tests, not copied):
- MLX's documentation (docs/src/dev/custom_metal_kernels.rst): a templated elementwise
  body, the strided variant with elem_to_loc, and a bilinear sampler whose backward
  pass uses atomic_outputs, init_value=0, simd_sum and ceildiv/threads_per_simdgroup;
- Hmbown/ZMLX (src/zmlx/msl.py, kernels/norms.py): `header="#include <metal_stdlib>\\n
  using namespace metal;\\n"` plus templated activation helpers, bodies specialised with
  `constexpr uint D = ...;` and a threadgroup tree reduction with metal::rsqrt;
- MLX's steel headers and community kernels: #pragma unroll, _Pragma unroll macros,
  #define with line splices, #if/#else, INFINITY/MAXFLOAT/M_PI_F, <metal_simdgroup>.
Each runs through `emulator.install()` as unmodified `mx.fast.metal_kernel` code and
is compared with the MLX reference op on fresh random inputs.
"""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator
from hlh_mlx.emulator import SanitizerError, UnsafeKernelError


@pytest.fixture
def metal():
    """mx.fast.metal_kernel, routed to the emulator as a user would have it."""
    assert emulator.install()
    yield mx.fast.metal_kernel
    emulator.uninstall()


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32)), rtol=tol, atol=tol)


# ---------------------------------------------------------------- MLX documentation patterns
def test_docs_style_templated_exp_in_half(metal, rng):
    k = metal(name="docexp", input_names=["inp"], output_names=["out"],
              source="uint elem = thread_position_in_grid.x;\nT tmp = inp[elem];\nout[elem] = metal::exp(tmp);")
    a = mx.array(rng.standard_normal((4, 16)).astype(np.float32)).astype(mx.float16)
    (b,) = k(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[a.shape], output_dtypes=[a.dtype])
    close(b, mx.exp(a), 2e-3)


def test_docs_style_strided_exp(metal, rng):
    src = """
        uint elem = thread_position_in_grid.x;
        // utils from mlx/backend/metal/kernels/utils.h are there
        uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
        T tmp = inp[loc];
        out[elem] = metal::exp(tmp);
    """
    k = metal(name="docexp_strided", input_names=["inp"], output_names=["out"], source=src,
              ensure_row_contiguous=False)
    a = mx.array(rng.standard_normal((8, 16)).astype(np.float32)).astype(mx.float16)[::2]
    (b,) = k(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[a.shape], output_dtypes=[a.dtype])
    close(b, mx.exp(a), 2e-3)


LERP_FWD = """
    uint elem = thread_position_in_grid.x;
    int L = x_shape[1];
    int C = x_shape[2];
    int P = pos_shape[1];
    uint p = elem / C;              // (batch, point)
    int c = elem % C;
    int b = p / P;
    float u = (pos[p] + 1) * L / 2 - 0.5f;
    int i0 = floor(u);
    int i1 = i0 + 1;
    T w1 = u - i0;
    T w0 = 1 - w1;
    T v0 = (i0 >= 0 && i0 < L) ? x[(b * L + i0) * C + c] : T(0);
    T v1 = (i1 >= 0 && i1 < L) ? x[(b * L + i1) * C + c] : T(0);
    out[elem] = w0 * v0 + w1 * v1;
"""
LERP_BWD = """
    uint elem = thread_position_in_grid.x;
    int L = x_shape[1];
    int C = x_shape[2];
    int P = pos_shape[1];
    int C_padded = ceildiv(C, threads_per_simdgroup) * threads_per_simdgroup;
    uint p = elem / C_padded;
    int c = elem % C_padded;
    int b = p / P;
    float u = (pos[p] + 1) * L / 2 - 0.5f;
    int i0 = floor(u);
    int i1 = i0 + 1;
    T w1 = u - i0;
    T w0 = 1 - w1;
    T gu = 0;
    if (c < C) {
        T g = cot[p * C + c];
        if (i0 >= 0 && i0 < L) {
            atomic_fetch_add_explicit(&x_grad[(b * L + i0) * C + c], w0 * g, memory_order_relaxed);
            gu -= x[(b * L + i0) * C + c] * g;
        }
        if (i1 >= 0 && i1 < L) {
            atomic_fetch_add_explicit(&x_grad[(b * L + i1) * C + c], w1 * g, memory_order_relaxed);
            gu += x[(b * L + i1) * C + c] * g;
        }
    }
    gu = simd_sum(gu);
    if (thread_index_in_simdgroup == 0)
        atomic_fetch_add_explicit(&pos_grad[p], gu * L / 2, memory_order_relaxed);
"""


def lerp_ref(x, pos):
    B, L, C = x.shape
    u = (pos + 1) * L / 2 - 0.5
    f0 = mx.stop_gradient(mx.floor(u))
    i0 = f0.astype(mx.int32)
    w1 = u - f0
    out = mx.zeros((B, pos.shape[1], C))
    for i, w in ((i0, 1 - w1), (i0 + 1, w1)):
        ok = (i >= 0) & (i < L)
        v = mx.take_along_axis(x, mx.clip(i, 0, L - 1)[..., None], axis=1)
        out = out + mx.where(ok[..., None], v, 0) * w[..., None]
    return out


def test_docs_style_interpolation_with_atomic_backward(metal, rng):
    """The structure of the docs' grid_sample: a fused forward, and a backward that
    pads channels to whole simdgroups, reduces with simd_sum and accumulates with
    atomics into outputs initialised to zero."""
    fwd = metal(name="lerp", input_names=["x", "pos"], output_names=["out"], source=LERP_FWD)
    bwd = metal(name="lerp_grad", input_names=["x", "pos", "cot"], output_names=["x_grad", "pos_grad"],
                source=LERP_BWD, atomic_outputs=True)
    B, L, C, P = 2, 13, 5, 7
    x = mx.array(rng.standard_normal((B, L, C)).astype(np.float32))
    pos = mx.array(rng.uniform(-1.1, 1.1, (B, P)).astype(np.float32))
    (y,) = fwd(inputs=[x, pos], template=[("T", mx.float32)], output_shapes=[(B, P, C)],
               output_dtypes=[mx.float32], grid=(B * P * C, 1, 1), threadgroup=(256, 1, 1))
    close(y, lerp_ref(x, pos), 1e-5)
    cot = mx.array(rng.standard_normal((B, P, C)).astype(np.float32))
    c_pad = (C + 31) // 32 * 32
    gx, gpos = bwd(inputs=[x, pos, cot], template=[("T", mx.float32)], output_shapes=[x.shape, pos.shape],
                   output_dtypes=[mx.float32, mx.float32], grid=(B * P * c_pad, 1, 1), threadgroup=(256, 1, 1),
                   init_value=0)
    _, (rx, rpos) = mx.vjp(lerp_ref, [x, pos], [cot])
    close(gx, rx, 1e-4)
    close(gpos, rpos, 1e-3)


# ---------------------------------------------------------------- kernel-library patterns
LIB_HEADER = """#include <metal_stdlib>
using namespace metal;

template <typename T>
inline T lib_sigmoid(T x) {
    T y = T(1) / (T(1) + metal::exp(metal::abs(x)));
    return (x < T(0)) ? y : T(1) - y;
}

template <typename T>
inline T lib_silu(T x) { return x * lib_sigmoid(x); }
"""


def rmsnorm_source(D, TG, eps):
    return f"""
        constexpr uint D = {D};
        constexpr uint TG = {TG};
        constexpr float EPS = {eps}f;
        uint tid = thread_position_in_threadgroup.x;
        uint base = (thread_position_in_grid.x / TG) * D;
        threadgroup float part[TG];
        float acc = 0.0f;
        for (uint j = tid; j < D; j += TG) {{ float v = (float)inp[base + j]; acc += v * v; }}
        part[tid] = acc;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint s = TG / 2; s > 0; s >>= 1) {{
            if (tid < s) part[tid] += part[tid + s];
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }}
        float inv = metal::rsqrt(part[0] / (float)D + EPS);
        for (uint j = tid; j < D; j += TG) out[base + j] = (T)((float)inp[base + j] * inv * (float)weight[j]);
    """


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 3e-3)])
def test_library_style_rmsnorm_with_metal_stdlib_header(metal, rng, dtype, tol):
    D, TG, rows = 96, 64, 5
    k = metal(name="lib_rmsnorm", input_names=["inp", "weight"], output_names=["out"],
              source=rmsnorm_source(D, TG, 1e-6), header=LIB_HEADER, ensure_row_contiguous=True)
    x = mx.array(rng.standard_normal((rows, D)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal(D).astype(np.float32)).astype(dtype)
    (y,) = k(inputs=[x, w], template=[("T", dtype)], grid=(rows * TG, 1, 1), threadgroup=(TG, 1, 1),
             output_shapes=[x.shape], output_dtypes=[dtype])
    close(y, mx.fast.rms_norm(x, w, 1e-6), tol)


def test_library_style_swiglu_with_header_helpers(metal, rng):
    k = metal(name="lib_swiglu", input_names=["gate", "up"], output_names=["out"], header=LIB_HEADER,
              source="uint i = thread_position_in_grid.x;\n"
                     "out[i] = (T)(lib_silu((float)gate[i]) * (float)up[i]);")
    g = mx.array(rng.standard_normal(1000).astype(np.float32))
    u = mx.array(rng.standard_normal(1000).astype(np.float32))
    (y,) = k(inputs=[g, u], template=[("T", mx.float32)], grid=(1000, 1, 1), threadgroup=(128, 1, 1),
             output_shapes=[g.shape], output_dtypes=[mx.float32])
    close(y, g * mx.sigmoid(g) * u, 1e-5)


PREPROCESSED = """#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_math>
#include <metal_atomic>
#include <metal_compute>
#pragma clang diagnostic ignored "-Wunused-variable"
using namespace metal;

#define STEEL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define SCALE(x, s) \\
    ((x) * (s))
#if defined(USE_FAST)
#error "not this branch"
#else
#define NEG_BIG (-INFINITY)
#endif
"""
SOFTMAX = """
    uint row = threadgroup_position_in_grid.y;
    uint lane = thread_index_in_simdgroup;
    const device float* x = inp + row * N;
    float m = NEG_BIG;
    #pragma unroll
    for (int i = lane; i < N; i += 32) m = max(m, x[i]);
    m = simd_max(m);
    float s = 0.0f;
    STEEL_PRAGMA_UNROLL
    for (int i = lane; i < N; i += 32) s += metal::exp(SCALE(x[i] - m, 1.0f));
    s = simd_sum(s);
    for (int i = lane; i < N; i += 32) out[row * N + i] = metal::exp(x[i] - m) / s;
    if (lane == 0) flags[row] = (MAXFLOAT > 1e38f) + 2 * (isinf(INFINITY)) + 4 * isnan(NAN)
                                + 8 * (fabs(M_PI_F - 3.14159265f) < 1e-6f) + 16 * (FLT_MAX == MAXFLOAT)
                                + 32 * (HUGE_VALF == INFINITY);
"""


def test_headers_pragmas_macros_and_metal_constants(metal, rng):
    k = metal(name="pp_softmax", input_names=["inp"], output_names=["out", "flags"], source=SOFTMAX,
              header=PREPROCESSED)
    R, N = 3, 77
    x = mx.array(rng.standard_normal((R, N)).astype(np.float32) * 4)
    y, flags = k(inputs=[x], template=[("N", N)], grid=(32, R, 1), threadgroup=(32, 1, 1),
                 output_shapes=[(R, N), (R,)], output_dtypes=[mx.float32, mx.int32])
    close(y, mx.softmax(x, axis=-1), 1e-5)
    assert np.asarray(flags).tolist() == [63] * R


def test_a_refused_directive_names_its_line_and_the_allowed_ones(metal):
    with pytest.raises(UnsafeKernelError, match=r"header line 3: '#include \"my_helpers.h\"' is not allowed.*header="):
        metal(name="inc", input_names=["inp"], output_names=["out"], source="out[0] = 1;",
              header="#include <metal_stdlib>\nusing namespace metal;\n#include \"my_helpers.h\"\n")


# ---------------------------------------------------------------- sanitizer fidelity
def test_missing_barrier_read_before_a_later_write_is_a_race_naming_both_threads(rng):
    """Thread 0 reads the slot thread 1 writes in the same barrier interval."""
    src = """
        threadgroup float buf[2];
        uint t = thread_index_in_threadgroup;
        if (t == 0) out[0] = buf[1];
        if (t == 1) buf[1] = inp[1];
    """
    k = emulator.metal_kernel("late_write", ["inp"], ["out"], src, sanitize=True)
    with pytest.raises(SanitizerError) as e:
        k(inputs=[mx.ones((2,))], grid=(2, 1, 1), threadgroup=(2, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
    assert e.value.kind == "race"
    assert sorted(t["thread_index_in_threadgroup"] for t in e.value.threads) == [0, 1]
    assert e.value.line == 5  # the write that completes the race


def test_a_read_no_thread_ever_writes_is_still_uninitialized():
    src = """
        threadgroup float buf[2];
        uint t = thread_index_in_threadgroup;
        if (t == 0) out[0] = buf[1];
    """
    k = emulator.metal_kernel("never_written", ["inp"], ["out"], src, sanitize=True)
    with pytest.raises(SanitizerError) as e:
        k(inputs=[mx.ones((2,))], grid=(2, 1, 1), threadgroup=(2, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])
    assert e.value.kind == "uninitialized" and e.value.line == 4


@pytest.mark.parametrize("reach", [1, 1000, 300_000])
def test_out_of_bounds_that_lands_in_another_buffer_is_caught(rng, reach):
    """`a` and `b` are neighbours in memory; reading `a` past its end must not quietly
    read `b` (bounds are per buffer, not per allocation)."""
    src = "uint i = thread_position_in_grid.x; out[i] = a[i + OFF] + b[i];"
    k = emulator.metal_kernel("neighbour", ["a", "b"], ["out"], src, sanitize=True)
    a = mx.array(rng.standard_normal(64).astype(np.float32))
    b = mx.array(rng.standard_normal(1 << 19).astype(np.float32))
    with pytest.raises(SanitizerError) as e:
        k(inputs=[a, b], template=[("OFF", 64 - 1 + reach)], grid=(2, 1, 1), threadgroup=(2, 1, 1),
          output_shapes=[(2,)], output_dtypes=[mx.float32])
    assert e.value.kind == "out-of-bounds" and "'a'" in str(e.value) and e.value.line == 1


def test_windows_line_endings_compile_and_keep_line_numbers(metal):
    src = "uint i = thread_position_in_grid.x;\r\n#pragma unroll\r\nout[i] = inp[i] + 1;\r\nout[i] += undefined_name;\r\n"
    k = metal(name="crlf", input_names=["inp"], output_names=["out"], source=src.replace("out[i] += undefined_name;", ""))
    (y,) = k(inputs=[mx.ones((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(4,)],
             output_dtypes=[mx.float32])
    assert np.asarray(y).tolist() == [2.0] * 4
    bad = metal(name="crlf_bad", input_names=["inp"], output_names=["out"], source=src)
    with pytest.raises(emulator.KernelCompileError) as e:
        bad(inputs=[mx.ones((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(4,)],
            output_dtypes=[mx.float32])
    assert e.value.line == 4
