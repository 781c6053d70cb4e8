"""`metal_kernel`: the emulator's drop-in for `mx.fast.metal_kernel`."""

from __future__ import annotations

import os
import re
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import codegen, launch, safety, toolchain
from .codegen import InputSig

MAX_THREADS_PER_THREADGROUP = 1024

# Names go into the generated C++ (and the launcher's spec): each must be one C identifier,
# as Metal (and so MLX) requires of a kernel's buffers and template parameters.
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KERNEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _check_identifier(what: str, name) -> None:
    if not isinstance(name, str) or not _C_IDENTIFIER.fullmatch(name):
        raise ValueError(f"[metal_kernel] {what} {name!r} is not a valid identifier (letters, digits and "
                         "underscores, not starting with a digit)")

# numpy has no bfloat16: such arrays cross as their uint16 bits
_NP_DTYPES = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float64: np.float64,
    mx.complex64: np.complex64, mx.bool_: np.bool_, mx.int8: np.int8, mx.int16: np.int16,
    mx.int32: np.int32, mx.int64: np.int64, mx.uint8: np.uint8, mx.uint16: np.uint16,
    mx.uint32: np.uint32, mx.uint64: np.uint64,
}


def _to_mx(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


def _host_view(x: mx.array) -> np.ndarray:
    """A numpy view of the array's elements, with MLX's strides (bf16 as uint16 bits)."""
    mx.eval(x)
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(x)


def _fill_bytes(value: float | None, dtype) -> bytes:
    """init_value in the output dtype, or a poison pattern (NaN / all ones) without one."""
    if value is None:
        return b"\xff"
    return _host_view(mx.array(value, dtype=dtype).reshape(1)).tobytes()


def _triple(name: str, v) -> tuple[int, int, int]:
    try:
        t = tuple(int(a) for a in v)
    except TypeError:
        raise ValueError(f"[metal_kernel] `{name}` must be a tuple of 3 integers, got {v!r}") from None
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"[metal_kernel] `{name}` must be 3 positive integers, got {v!r}")
    return t


def _refuse(kind: str):
    def refuse(*_):
        raise ValueError(f"[metal_kernel] Primitive's {kind} not implemented: a custom kernel has no "
                         "derivative (as mx.fast.metal_kernel on a Mac)")
    return refuse


def _without_gradient(inputs: list, outs: list) -> list:
    """The outputs tied to the inputs in the graph, as a Metal kernel's are: a gradient or
    a forward derivative through them raises, as MLX's does for a custom kernel, where
    outputs computed on the host would otherwise be constants (a silent zero gradient)."""
    tied = mx.custom_function(lambda *_: list(outs))
    tied.vjp(_refuse("vjp"))
    tied.jvp(_refuse("jvp"))
    return list(tied(*inputs))


class MetalKernel:
    """A Metal kernel body, run by the CPU emulator with `mx.fast.metal_kernel` semantics."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 sanitize: bool | None = None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        # the kernel's name is only quoted (messages, the verbose Metal source, cache keys):
        # any word of letters, digits, '_', '-', '.' (no space, no newline, no control character)
        if not isinstance(name, str) or not _KERNEL_NAME.fullmatch(name):
            raise ValueError(f"[metal_kernel] kernel name {name!r} is not valid (letters, digits, '_', '-', '.')")
        for n in input_names:
            _check_identifier("input name", n)
        for n in output_names:
            _check_identifier("output name", n)
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.sanitize = sanitize
        for part, text in (("header", header), ("source", source)):
            safety.prepare(name, part, text)  # what the compiler may see: refused directives raise here
            safety.check(name, part, text)    # friendly errors for host escapes
        self._built: dict[str, object] = {}

    def _sanitizing(self) -> bool:
        if self.sanitize is not None:
            return bool(self.sanitize)
        return os.environ.get("HLH_MLX_SANITIZE", "") not in ("", "0")

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None) -> list[mx.array]:
        def check_size(actual, expected, what):
            if actual != expected:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {expected} but got size {actual}.")
        inputs = [_to_mx(x) for x in inputs]
        check_size(len(inputs), len(self.input_names), "inputs")
        check_size(len(output_shapes), len(self.output_names), "output_shapes")
        check_size(len(output_dtypes), len(self.output_names), "output_dtypes")
        grid = _triple("grid", grid)
        threadgroup = _triple("threadgroup", threadgroup)
        tg_size = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if tg_size > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"[metal_kernel] Thread group size ({tg_size}) is greater than  the maximum allowed threads "
                f"per threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        # MLX clamps the threadgroup to the grid, per dimension
        threadgroup = tuple(min(t, g) for t, g in zip(threadgroup, grid))
        template = list(template or [])
        for item in template:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"[metal_kernel] Invalid template argument {item!r}: must be a (name, value) pair.")
            _check_identifier("template parameter name", item[0])
            codegen.template_value(item[1])
        sigs = [InputSig(n, x.dtype, x.ndim, x.size) for n, x in zip(self.input_names, inputs)]
        output_shapes = [tuple(int(d) for d in s) for s in output_shapes]
        if verbose:
            src = codegen.metal_source(self.name, self.header, self.source, sigs, self.output_names,
                                       output_dtypes, template, self.atomic_outputs)
            print(f"Generated source code for `{self.name}`:\n```\n{src}\n```")
        sanitize = self._sanitizing()
        plist = codegen.params(sigs, self.source, self.output_names, output_dtypes, self.atomic_outputs)
        exe = self._executable(sigs, output_dtypes, template, plist, sanitize)
        regions = self._regions(plist, inputs, output_shapes, output_dtypes, init_value)
        blobs = launch.run(self.name, exe, regions, grid, threadgroup, sanitize=sanitize, source=self.source,
                           header=self.header, reverse=os.environ.get("HLH_MLX_EMU_ORDER") == "reverse")
        outs = []
        for shape, dtype, blob in zip(output_shapes, output_dtypes, blobs[-len(self.output_names):]):
            host = np.frombuffer(blob, dtype=_NP_DTYPES[dtype]).reshape(shape).copy()
            arr = mx.array(host)
            outs.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
        return _without_gradient(inputs, outs)

    def _executable(self, sigs, output_dtypes, template, plist, sanitize):
        key = codegen.kernel_name(self.name, template, sigs, output_dtypes) + repr(
            [(p.name, p.role) for p in plist]) + str(sanitize)
        if key not in self._built:
            tu = codegen.cpp_unit(self.name, self.header, self.source, plist, template, sanitize)
            self._built[key] = toolchain.build_kernel(self.name, tu, self.source, self.header,
                                                      "sanitize" if sanitize else "fast")
        return self._built[key]

    def _regions(self, plist, inputs, output_shapes, output_dtypes, init_value) -> list[launch.Region]:
        by_name = dict(zip(self.input_names, inputs))
        hosts: dict[str, tuple[bytes, int, list[int], np.ndarray]] = {}
        regions = []
        for p in plist:
            if p.role == "output":
                i = self.output_names.index(p.of)
                dtype, shape = output_dtypes[i], output_shapes[i]
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
                regions.append(launch.Region(p.name, nbytes, None, _fill_bytes(init_value, dtype)))
                continue
            x = by_name[p.of]
            if p.of not in hosts:
                host = _host_view(x)
                if self.ensure_row_contiguous or x.ndim == 0:
                    c = np.ascontiguousarray(host)
                    hosts[p.of] = (c.tobytes(), 0, [s // max(c.itemsize, 1) for s in c.strides], c)
                else:
                    data, pointer, strides = launch.strided_region(host)
                    hosts[p.of] = (data, pointer, strides, host)
            data, pointer, strides, host = hosts[p.of]
            if p.role == "input":
                regions.append(launch.Region(p.name, len(data), data, pointer=pointer))
            elif p.role == "shape":
                regions.append(launch.Region(p.name, 4 * x.ndim, np.array(x.shape, np.int32).tobytes()))
            elif p.role == "strides":
                regions.append(launch.Region(p.name, 8 * x.ndim, np.array(strides, np.int64).tobytes()))
            else:  # ndim
                regions.append(launch.Region(p.name, 4, np.array([x.ndim], np.int32).tobytes()))
        return regions


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 sanitize: bool | None = None, **_compile_options) -> MetalKernel:
    """Build an emulated Metal kernel with the signature and call of `mx.fast.metal_kernel`.

    Args:
      sanitize: check for races, out-of-bounds accesses, uninitialized threadgroup
        reads and barrier divergence (default: the HLH_MLX_SANITIZE environment variable).
      Other arguments as `mx.fast.metal_kernel`; `compile_options` is accepted and ignored
      (math modes only change GPU code generation).
    """
    return MetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                       atomic_outputs, sanitize)
