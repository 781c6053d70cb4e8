"""The CUDA source MLX compiles for a custom kernel, and an offline compile check.

`kernel_source` writes what `mx.fast.cuda_kernel` (MLX 0.32, mlx/backend/cuda/
custom_kernel.cpp) builds around a body: MLX's device header, the template's header, then
`__global__ void name(const T* in, Shape in_shape, ..., T* out)` with `_shape`, `_strides`
and `_ndim` parameters only for names the body mentions, and template arguments as
`constexpr` / `using` lines. `compile_check` runs it through nvcc for sm_90a with a small
stand-in for MLX's device header, so a CUDA template's syntax and types are checked on a
machine without a GPU before any device time is spent. It proves that the code compiles,
not that it is correct: that takes the GPU.

`compact` is the text a kernel is handed to MLX as: MLX's CUDA back end copies the body into
a new source at every graph build and hashes the whole source at every evaluation (the JIT
module's name), so a template's comments and indentation cost host time on every call.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

CUDA_TYPES = {mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
              mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
              mx.uint64: "uint64_t", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.float32: "float", mx.float64: "double"}

# What the body may use from mlx/backend/cuda/device/utils.cuh: the fp16/bf16 types and
# the fixed-size Shape/Strides arrays (MAX_NDIM = 10) passed by value.
STAND_IN_HEADER = """\
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cooperative_groups.h>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


class CudaCompileError(RuntimeError):
    pass


def kernel_source(name: str, header: str, source: str, inputs: list[tuple[str, object, int]],
                  outputs: list[tuple[str, object]], template_args: list, prelude: str | None = None) -> str:
    """inputs: (name, dtype, ndim); outputs: (name, dtype); template_args: (name, value)."""
    params = []
    for n, dtype, ndim in inputs:
        params.append(f"    const {CUDA_TYPES[dtype]}* {n}")
        if ndim > 0:
            if f"{n}_shape" in source:
                params.append(f"    const __grid_constant__ Shape {n}_shape")
            if f"{n}_strides" in source:
                params.append(f"    const __grid_constant__ Strides {n}_strides")
            if f"{n}_ndim" in source:
                params.append(f"    const __grid_constant__ int {n}_ndim")
    params += [f"    {CUDA_TYPES[dtype]}* {n}" for n, dtype in outputs]
    consts = []
    for n, v in template_args:
        if isinstance(v, bool):
            consts.append(f"  constexpr bool {n} = {str(v).lower()};")
        elif isinstance(v, int):
            consts.append(f"  constexpr int {n} = {v};")
        else:
            consts.append(f"  using {n} = {CUDA_TYPES[v]};")
    head = prelude if prelude is not None else '#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n'
    return (f"{head}\n{header}namespace mlx::core::cu {{\n\nnamespace cg = cooperative_groups;\n\n"
            f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
            + ("\n".join(consts) + "\n\n" if consts else "") + source + "\n}\n\n} // namespace mlx::core::cu\n")


def compact(text: str) -> str:
    """`text` without `//` comments, indentation and trailing blanks, one line for each line
    (so compiler messages still map to template lines). A line is kept whole where stripping
    could change the program: in or beside a `/*` comment, ending in a backslash (a `//`
    comment there runs on into the next line), after such a line, or where a quote leaves it
    unclear whether `//` is inside a literal."""
    out, after_backslash, in_block = [], False, False
    for line in text.split("\n"):
        whole = after_backslash or in_block or line.endswith("\\") or "/*" in line or "*/" in line
        if "/*" in line or "*/" in line:
            in_block = line.rfind("/*") > line.rfind("*/")
        after_backslash = line.endswith("\\")
        out.append(line if whole else _strip_comment(line).strip())
    return "\n".join(out)


def mlx_text(rendered) -> tuple[str, str]:
    """(body, header) of a rendered CUDA variant as hlh_mlx hands them to `mx.fast.cuda_kernel`."""
    return compact(rendered.source), compact(rendered.header)


def _strip_comment(line: str) -> str:
    """`line` up to a `//` that is outside every string and character literal (the whole line
    where a literal is left open: unclear, so kept)."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif line.startswith("//", i):
            return line[:i]
        i += 1
    return line


def nvcc() -> str | None:
    return shutil.which("nvcc")


def compile_check(text: str, arch: str = "sm_90a", timeout: float = 120) -> None:
    """Compile CUDA source to an object with nvcc; CudaCompileError carries its messages."""
    from .emulator import EmulatorError, toolchain
    exe = nvcc()
    if exe is None:
        raise CudaCompileError("nvcc not found (install the CUDA toolkit to check CUDA templates offline)")
    with tempfile.TemporaryDirectory(prefix="hlh_cuda_") as d:
        src = Path(d) / "kernel.cu"
        src.write_text(text)
        # as MLX's NVRTC call (--gpu-architecture=sm_90a): PTX for compute_90a, so Hopper-only
        # instructions (wgmma, setmaxnreg) assemble; plain -arch=sm_90a emits compute_90 PTX
        virt = arch.replace("sm_", "compute_")
        # kernel text steers nvcc and the host compiler as it steers the emulator's: run as
        # the emulator runs its tools (confined, limited, its output capped)
        try:
            r = toolchain.run_bounded([exe, "-std=c++17", f"-gencode=arch={virt},code={arch}", "-c", str(src),
                                       "-o", str(Path(d) / "kernel.o")], "(cuda check)", Path(d),
                                      "the offline CUDA compile", timeout=timeout)
        except EmulatorError as e:
            raise CudaCompileError(str(e)) from None
        if r.returncode != 0:
            raise CudaCompileError((r.stderr or r.stdout).replace(str(src), "kernel.cu").strip())


def variant_source(variant, op, dtype: str, prelude: str | None = None, shape: dict | None = None) -> tuple[str, int]:
    """A variant's full CUDA source for `dtype` with the template arguments of `shape` (default:
    the op's first emulator shape; compile-time sizes such as K unroll differently at GPU
    shapes), and the line (1-based) where the body starts."""
    import numpy as np
    from .ops.spec import DTYPES
    t, r = variant.template, variant.rendered
    arrays = op.make_inputs(op.emulator_shapes[0], DTYPES[dtype], np.random.default_rng(0))
    outs = op.output_dtypes(DTYPES[dtype])
    source, header = mlx_text(r)  # what runs, not the commented rendering
    text = kernel_source(f"hlh_{t.op}_{t.family}_{variant.id}", header, source,
                         [(n, a.dtype, a.ndim) for n, a in zip(t.inputs, arrays)],
                         list(zip(t.outputs, outs)), variant.template_args(shape or op.emulator_shapes[0], dtype),
                         prelude)
    head = text[:text.index(source)] if source else text
    return text, head.count("\n") + 1


def check_variant(variant, op, dtype: str, shape: dict | None = None) -> None:
    """Compile a CUDA variant offline (template arguments of `shape`, default the op's first
    emulator shape); errors name the template file and line."""
    import re
    text, body = variant_source(variant, op, dtype, STAND_IN_HEADER, shape)
    try:
        compile_check(text)
    except CudaCompileError as e:
        msg = str(e)
        m = re.search(r"kernel\.cu\((\d+)\): error: (.*)", msg)
        if m and int(m.group(1)) >= body:
            tline = variant.rendered.template_line("source", int(m.group(1)) - body + 1)
            if tline:
                raise CudaCompileError(f"{variant.template.path}:{tline}: {m.group(2)} ({dtype})") from None
        raise CudaCompileError(f"{variant.template.path}: {dtype}: {msg.splitlines()[0] if msg else 'nvcc failed'}") from None


def check_variants(jobs: list, op, workers: int | None = None) -> None:
    """Compile many variants offline, `jobs` = [(variant, dtype, shape or None)], several to
    an nvcc run (its headers cost seconds a run), each in a namespace of its own, the runs
    on `workers` threads; on an error the failing run's variants are compiled alone, so the
    message names the template line."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))

    def together(part):
        texts = [STAND_IN_HEADER]
        for i, (v, dtype, shape) in enumerate(part):
            text, _ = variant_source(v, op, dtype, prelude="", shape=shape)
            texts.append(f"namespace hlh_v{i} {{\nusing namespace ::mlx::core::cu;\n{text}\n}}\n")
        try:
            compile_check("\n".join(texts), timeout=600)
        except CudaCompileError:
            for v, dtype, shape in part:
                check_variant(v, op, dtype, shape)
            raise
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(together, [jobs[i::n] for i in range(n)]))
