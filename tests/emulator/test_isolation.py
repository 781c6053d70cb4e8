"""Host safety, crash and hang isolation, dispatch errors, and install()."""

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator
from hlh_mlx.emulator import KernelCompileError, KernelCrashError, KernelTimeoutError, UnsafeKernelError


def call(k, n=4, **kw):
    return k(inputs=[mx.ones((n,))], grid=(n, 1, 1), threadgroup=(n, 1, 1), output_shapes=[(n,)],
             output_dtypes=[mx.float32], **kw)


ESCAPES = [  # friendly errors, before anything is compiled (test_redteam.py: what stands behind them)
    ("source", '#include <stdlib.h>\nout[0] = 1;', "'#include <stdlib.h>' is not allowed"),
    ("source", '#line 7 "x"\nout[0] = 1;', "directive '#line' is not allowed"),
    ("source", 'asm("nop"); out[0] = 1;', "'asm' (inline assembly)"),
    ("source", '__asm__("nop"); out[0] = 1;', "'__asm__' (inline assembly)"),
    ("header", '__attribute__((constructor)) void f() {}', "attribute 'constructor'"),
    ("header", '[[gnu::constructor]] void f() {}', "compiler attribute 'gnu::'"),
    ("source", 'system("id"); out[0] = 1;', "call to 'system'"),
    ("source", 'auto f = fopen ("/etc/passwd", "r");', "call to 'fopen'"),
    ("header", 'extern "C" int unlink(const char*);', "'extern'"),
    ("source", 'std::exit(0);', "'std'"),
]


@pytest.mark.parametrize("part,text,named", ESCAPES)
def test_host_escapes_are_refused_before_compiling(part, text, named):
    kw = {"source": text, "header": ""} if part == "source" else {"source": "out[0] = 1;", "header": text}
    with pytest.raises(UnsafeKernelError) as e:
        emulator.metal_kernel("escape", ["inp"], ["out"], **kw)
    assert named in str(e.value) and f"{part} line" in str(e.value)


def test_ordinary_names_are_not_mistaken_for_escapes():
    src = """
        struct Reader { float read(int i) const { return float(i); } };
        Reader r;
        float section = 2.0f, alias = 1.0f;
        uint i = thread_position_in_grid.x;
        out[i] = r.read(1) + metal::abs(min(section, alias)) + inp[i];
    """
    k = emulator.metal_kernel("names", ["inp"], ["out"], src, header="[[maybe_unused]] constant float kOne = 1.0f;\n")
    assert np.asarray(call(k)[0]).tolist() == [3.0] * 4


def test_words_in_comments_and_strings_are_not_code():
    k = emulator.metal_kernel("fine", ["inp"], ["out"], '// system("id") and #include <x> in a comment\n'
                              'uint i = thread_position_in_grid.x; out[i] = inp[i]; /* asm */')
    (y,) = call(k)
    assert np.asarray(y).tolist() == [1.0] * 4


def test_a_self_declared_libc_function_is_refused_at_link_check():
    # no forbidden word, yet the object would link against libc's getpid
    k = emulator.metal_kernel("decl", ["inp"], ["out"], "out[0] = float(getpid());", header="int getpid();")
    with pytest.raises(UnsafeKernelError, match="outside the Metal/MLX surface: getpid"):
        call(k)


def test_crash_is_isolated_and_reported_with_the_thread():
    k = emulator.metal_kernel("crash", ["inp"], ["out"],
                              "uint i = thread_position_in_grid.x; if (i == 2) { device float* p = (device float*)8; out[i] = *p; }")
    with pytest.raises(KernelCrashError, match=r"SIGSEGV in thread \(2, 0, 0\)"):
        call(k)
    # the caller is fine and the next kernel runs
    ok = emulator.metal_kernel("after", ["inp"], ["out"], "uint i = thread_position_in_grid.x; out[i] = inp[i] + 1;")
    assert np.asarray(call(ok)[0]).tolist() == [2.0] * 4


def test_hang_is_stopped_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HLH_MLX_EMU_TIMEOUT", "2")
    k = emulator.metal_kernel("hang", ["inp"], ["out"], "volatile int x = 1; while (x) {} out[0] = 1;")
    with pytest.raises(KernelTimeoutError, match="did not finish within 2 s"):
        call(k)


def test_deep_private_arrays_overflow_is_a_crash_not_a_hang():
    src = "volatile float big[1 << 20]; uint i = thread_position_in_grid.x; big[i * 1000] = inp[i]; " \
          "threadgroup_barrier(mem_flags::mem_none); out[i] = big[i * 1000];"
    k = emulator.metal_kernel("stack", ["inp"], ["out"], src)
    with pytest.raises(KernelCrashError, match="stack overflow"):
        call(k)


def test_compile_errors_name_the_kernel_line():
    k = emulator.metal_kernel("typo", ["inp"], ["out"], "uint i = thread_position_in_grid.x;\nout[i] = inp[i] + undefined_name;")
    with pytest.raises(KernelCompileError) as e:
        call(k)
    assert e.value.where == "source" and e.value.line == 2
    assert "undefined_name" in str(e.value) and "kernel 'typo'" in str(e.value)


def test_threadgroup_over_1024_threads_is_refused_like_metal():
    k = emulator.metal_kernel("big", ["inp"], ["out"], "out[0] = 1;")
    with pytest.raises(ValueError, match=r"Thread group size \(2048\) is greater than"):
        k(inputs=[mx.ones((4,))], grid=(4096, 1, 1), threadgroup=(2048, 1, 1), output_shapes=[(1,)],
          output_dtypes=[mx.float32])


def test_threadgroup_memory_over_32kb_is_refused():
    k = emulator.metal_kernel("tgmem", ["inp"], ["out"],
                              "threadgroup float a[8192]; threadgroup float b[8]; a[0] = 1; b[0] = 2; out[0] = a[0] + b[0];")
    with pytest.raises(ValueError, match="exceeds the 32 KB"):
        call(k, n=1)


def test_argument_count_errors_match_mlx():
    k = emulator.metal_kernel("args", ["a", "b"], ["out"], "out[0] = a[0];")
    with pytest.raises(ValueError, match="Expected `inputs` to have size 2 but got size 1"):
        call(k)


def test_install_runs_unmodified_mlx_kernel_code(rng):
    emulator.install()
    try:
        assert emulator.installed()
        source = """
            uint elem = thread_position_in_grid.x;
            T tmp = inp[elem];
            out[elem] = metal::exp(tmp);
        """
        kernel = mx.fast.metal_kernel(name="myexp", input_names=["inp"], output_names=["out"], source=source)
        a = mx.array(rng.standard_normal((4, 16)).astype(np.float32))
        outputs = kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
                         output_shapes=[a.shape], output_dtypes=[a.dtype], verbose=False)
        np.testing.assert_allclose(np.asarray(outputs[0]), np.exp(np.asarray(a)), rtol=1e-6)
    finally:
        emulator.uninstall()
    assert not emulator.installed()
