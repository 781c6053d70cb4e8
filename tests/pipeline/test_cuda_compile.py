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
    assert text.splitlines()[body - 1] == v.rendered.source.splitlines()[0]


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
