"""CUDA templates compile (nvcc, sm_90a) as MLX would wrap them, before any GPU time is
spent; a compile error names the template file and line. Correctness needs the GPU."""

import pytest

from hlh_mlx import cuda_source, ops, templates, variants

CUDA = [t for t in templates.discover() if t.backend == "cuda"]
needs_nvcc = pytest.mark.skipif(cuda_source.nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


def test_kernel_source_has_mlx_signature():
    t = next(t for t in CUDA if t.op == "rms_norm")
    v = variants.expand(t)[0]
    text, body = cuda_source.variant_source(v, ops.get("rms_norm"), "float16")
    assert ("const __half* x,\n    const __grid_constant__ Shape x_shape,\n    const __half* w,\n"
            "    const float* eps,\n    __half* y) {") in text
    assert "x_strides" not in text  # only what the body mentions
    assert "  using T = __half;" in text
    assert text.splitlines()[body - 1] == cuda_source.compact(v.rendered.source).splitlines()[0]


def test_compact_drops_comments_and_indentation_and_keeps_every_line():
    src = ('  int a = 1;  // one\n'
           '    // a whole-line comment\n'
           '  const char* s = "http://x"; // after a string\n'
           "  char c = '/'; int d = a / 2; // c\n"
           '  /* block // with slashes\n'
           '     still block // here */\n'
           '  #define TWO(x) \\\n'
           '      ((x) * 2)  // continued\n'
           '  int z = 0;  // a comment that runs on \\\n'
           '  int w = 1;\n'
           '  float f = 1.0f;')
    out = cuda_source.compact(src)
    assert out.split("\n") == [
        "int a = 1;", "", 'const char* s = "http://x";', "char c = '/'; int d = a / 2;",
        "  /* block // with slashes", "     still block // here */",  # kept whole: a block comment
        "  #define TWO(x) \\", "      ((x) * 2)  // continued",  # kept whole: a continuation
        "  int z = 0;  // a comment that runs on \\", "  int w = 1;",  # stripping would uncomment w
        "float f = 1.0f;"]


def test_compact_source_is_what_the_templates_shrink_to():
    # every CUDA template loses its comments and indentation, never a line
    for t in CUDA:
        r = variants.expand(t)[0].rendered
        short = cuda_source.compact(r.source)
        assert short.count("\n") == r.source.count("\n"), t.relpath
        assert len(short) < len(r.source), t.relpath
        assert not any(line.lstrip().startswith("//") for line in short.splitlines()), t.relpath


@needs_nvcc
@pytest.mark.parametrize("template", CUDA, ids=lambda t: t.relpath)
def test_cuda_template_compiles(template):
    v = variants.sample(variants.expand(template), 1, seed=3)[0]
    dtype = "float16" if not template.dtypes or "float16" in template.dtypes else template.dtypes[0]
    cuda_source.check_variant(v, ops.get(template.op), dtype)


@needs_nvcc
def test_compile_error_names_template_line(tmp_path):
    src = next(t for t in CUDA if t.op == "swiglu").path.read_text()
    lines = src.splitlines()
    at = next(i for i, l in enumerate(lines) if "const" in l and not l.startswith(("{", "#")) and i > 15)
    lines.insert(at, "int broken = undeclared_name;")
    bad = tmp_path / "swiglu" / "elementwise.cuda.j2"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines))
    t = templates.load(bad)
    with pytest.raises(cuda_source.CudaCompileError, match=rf"elementwise.cuda.j2:{at + 1}: .*undeclared_name"):
        cuda_source.check_variant(variants.expand(t)[0], ops.get("swiglu"), "float16")


@needs_nvcc
def test_the_offline_nvcc_check_reads_no_file_outside_its_own_directory(tmp_path):
    """nvcc runs on template text as the emulator's compiler does: confined (Landlock), so an
    #include of a user's file fails to read it (unconfined, this valid C++ would compile)."""
    secret = tmp_path / "secret.h"
    secret.write_text("int SECRET_d41d8cd98f;\n")
    with pytest.raises(cuda_source.CudaCompileError) as e:
        cuda_source.compile_check(f'#include "{secret}"\n__global__ void k() {{}}\n')
    assert "SECRET_d41d8cd98f" not in str(e.value)
    cuda_source.compile_check("__global__ void k() {}\n")  # its own directory and the toolkit: it works
