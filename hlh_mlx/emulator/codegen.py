"""Generate what MLX would compile (for verbose=True) and the host C++ the emulator runs.

`metal_source` follows MLX's signature writer (mlx/backend/common/metal_kernel.cpp,
MLX 0.32): template parameters, inputs as `const device T*` (`constant` under 8
elements, `T&` for 0-d), `{name}_shape/_strides/_ndim` when the name occurs in the
source as a substring, outputs (atomic<T> with atomic_outputs), and each of the 20
thread attributes whose name occurs in the source. `cpp_unit` makes the same function
as host C++ with the same parameter order, so the body compiles unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from .errors import UnsafeKernelError
from .safety import blank_comments_and_strings, normalize, prepare

MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, Metal type) in MLX's order.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

DTYPE_NAMES = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float64: "double",
    mx.complex64: "complex64_t", mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t",
    mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t",
    mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}


def dtype_name(dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"[metal_kernel] Unsupported compilation type {dtype}") from None


@dataclass(frozen=True)
class InputSig:
    """How one input enters the signature (all MLX looks at when writing it)."""
    name: str
    dtype: object
    ndim: int
    size: int

    @property
    def space(self) -> str:
        return "constant" if self.size < MAX_CONSTANT_ARRAY_SIZE else "device"


@dataclass(frozen=True)
class Param:
    """One buffer of the generated function, in order: what it holds and its C++ type."""
    name: str
    role: str          # input | shape | strides | ndim | output
    of: str            # the input or output it belongs to
    cpp_type: str      # parameter type in the host C++
    by_ref: bool       # passed as a reference (0-d inputs, _ndim)


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def used_attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in ATTRIBUTES if a in source]


def template_value(value) -> tuple[str, str]:
    """(C++ template parameter kind, value as MLX prints it) of a template argument."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", dtype_name(value)
    raise ValueError(f"[metal_kernel] Invalid template argument {value!r}: must be a dtype, int or bool.")


def kernel_name(name: str, template, inputs: list[InputSig], output_dtypes) -> str:
    """MLX's name for the instantiated kernel (custom_kernel_<name>_<template>_<dtypes>)."""
    out = "custom_kernel_" + name
    if template:
        out += "_" + "_".join(template_value(v)[1] for _, v in template)
    for i in inputs:
        out += "_" + dtype_name(i.dtype) + ("s" if i.ndim == 0 else "c" if i.size < MAX_CONSTANT_ARRAY_SIZE else "")
    for d in output_dtypes:
        out += "_" + dtype_name(d)
    return out


def metal_source(name, header, source, inputs, output_names, output_dtypes, template, atomic_outputs) -> str:
    """The full Metal source MLX would compile for this call (printed by verbose=True)."""
    kname = kernel_name(name, template, inputs, output_dtypes)
    infos = shape_infos(source, [i.name for i in inputs])
    lines = []
    idx = 0
    for inp, (has_shape, has_strides, has_ndim) in zip(inputs, infos):
        ref = "&" if inp.ndim == 0 else "*"
        lines.append(f"  const {inp.space} {dtype_name(inp.dtype)}{ref} {inp.name} [[buffer({idx})]]")
        idx += 1
        if inp.ndim > 0:
            for flag, text in ((has_shape, f"const constant int* {inp.name}_shape"),
                               (has_strides, f"const constant int64_t* {inp.name}_strides"),
                               (has_ndim, f"const constant int& {inp.name}_ndim")):
                if flag:
                    lines.append(f"  {text} [[buffer({idx})]]")
                    idx += 1
    for out, dt in zip(output_names, output_dtypes):
        t = f"atomic<{dtype_name(dt)}>" if atomic_outputs else dtype_name(dt)
        lines.append(f"  device {t}* {out} [[buffer({idx})]]")
        idx += 1
    lines += [f"  {t} {a} [[{a}]]" for a, t in used_attributes(source)]
    text = header
    if template:
        text += "template <" + ", ".join(f"{template_value(v)[0]} {n}" for n, v in template) + ">\n"
    text += f"[[kernel]] void {kname}(\n" + ",\n".join(lines) + ") {\n" + source + "\n}\n"
    if template:
        tdef = kname + "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return text


def params(inputs: list[InputSig], source: str, output_names, output_dtypes, atomic_outputs) -> list[Param]:
    """The buffers of the generated function in order."""
    out = []
    for inp, (has_shape, has_strides, has_ndim) in zip(inputs, shape_infos(source, [i.name for i in inputs])):
        t = dtype_name(inp.dtype)
        if inp.ndim == 0:
            out.append(Param(inp.name, "input", inp.name, f"const {t}&", True))
            continue
        out.append(Param(inp.name, "input", inp.name, f"const {t}*", False))
        if has_shape:
            out.append(Param(f"{inp.name}_shape", "shape", inp.name, "const int*", False))
        if has_strides:
            out.append(Param(f"{inp.name}_strides", "strides", inp.name, "const int64_t*", False))
        if has_ndim:
            out.append(Param(f"{inp.name}_ndim", "ndim", inp.name, "const int&", True))
    for name, dt in zip(output_names, output_dtypes):
        t = f"atomic<{dtype_name(dt)}>" if atomic_outputs else dtype_name(dt)
        out.append(Param(name, "output", name, f"{t}*", False))
    return out


# `threadgroup T name[N]...;` declares memory shared by the group; other uses of the
# word are address-space qualifiers, which mean nothing on the host.
_TG_DECL = re.compile(
    r"\bthreadgroup\s+(?P<type>(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]*\]\s*)*);"
)
_TG_QUALIFIER = re.compile(r"\bthreadgroup\s+(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?\s*(?:const\s*)?[*&]")
_TG_WORD = re.compile(r"\bthreadgroup\b")

_SYNC_WORDS = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+|simdgroup_\w+)\b")


def needs_sync(text: str) -> bool:
    """Does the code synchronise threads (and so must run them as fibers)?"""
    return bool(_SYNC_WORDS.search(text)) and bool(_SYNC_WORDS.search(blank_comments_and_strings(text)))


def rewrite_threadgroup(kernel: str, part: str, text: str) -> str:
    """Give each `threadgroup` declaration one storage per group, keeping line numbers.

    Declarations are found in the text as prepare's lexer reads it (comments and literals
    blanked), and the result is prepared again: a rewrite never opens or closes a comment."""
    text = normalize(text)
    if "threadgroup" not in text:  # nothing to rewrite (and the lexing below costs on long headers)
        return text
    blank = blank_comments_and_strings(text, kernel, part)
    pieces, last = [], 0
    for k, m in enumerate(_TG_DECL.finditer(blank)):
        t, n, dims = m.group("type"), m.group("name"), m.group("dims").strip()
        slot = f"msl_tgslot_{n}_{k}"
        pieces.append(text[last:m.start()])
        pieces.append(
            f"static thread_local msl_tg_slot {slot}; {t} (&{n}){dims} = "
            f"*reinterpret_cast<{t}(*){dims}>(msl_rt_tg_alloc(&{slot}, sizeof({t}{dims}), alignof({t}{dims})));")
        last = m.end()
    pieces.append(text[last:])
    out = "".join(pieces)
    if pieces[:-1]:
        if prepare(kernel, part, out) != out:  # the rewrite must leave every directive as it was decided
            raise UnsafeKernelError(f"[emulator] kernel '{kernel}', {part}: rewriting threadgroup declarations "
                                    "changed how the text reads")
        blank = blank_comments_and_strings(out, kernel, part)
    # any other `threadgroup` must be a pointer/reference qualifier
    qualifiers = {m.start() for m in _TG_QUALIFIER.finditer(blank)}
    for m in _TG_WORD.finditer(blank):
        if m.start() not in qualifiers:
            line = blank.count("\n", 0, m.start()) + 1
            raise UnsafeKernelError(
                f"[emulator] kernel '{kernel}', {part} line {line}: unsupported threadgroup declaration "
                "(declare one threadgroup array per statement, without an initializer)")
    return out


# After the prelude, the compiler itself refuses these in kernel text, however they are
# spelled (line splices, macros, token pasting): inline assembly (the assembler can read
# files: .incbin) and __has_include (probes files). The _Pragma operator becomes a macro
# that expands to nothing: real kernels use it for unroll hints (MLX's steel headers),
# and no pragma it could name (GCC dependency reads a file) ever reaches the compiler.
POISON = ("#pragma GCC poison asm __asm __asm__ __has_include __has_include_next __has_include__ __has_embed\n"
          "#define _Pragma(x)\n")


def cpp_unit(kernel: str, header: str, source: str, plist: list[Param], template, sanitize: bool) -> str:
    """The host C++ translation unit for one instantiated kernel."""
    attrs = used_attributes(source)
    sig = [f"{p.cpp_type} {p.name}" for p in plist] + [f"{t} {a}" for a, t in attrs]
    tparams = ""
    targs = ""
    if template:
        tparams = "template <" + ", ".join(f"{template_value(v)[0]} {n}" for n, v in template) + ">\n"
        targs = "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
    args = []
    for i, p in enumerate(plist):
        base = p.cpp_type.rstrip("*&").strip()
        args.append(f"*({base}*)p[{i}]" if p.by_ref else f"({p.cpp_type})p[{i}]")
    for a, t in attrs:
        args.append(f"uint3(t->{a}.x, t->{a}.y, t->{a}.z)" if t == "uint3" else f"t->{a}")
    sync = int(needs_sync(header + "\n" + source))
    header, source = prepare(kernel, "header", header), prepare(kernel, "source", source)
    return (
        POISON
        + '#line 1 "header"\n' + rewrite_threadgroup(kernel, "header", header) + "\n"
        + tparams
        + "static void msl_body(" + ", ".join(sig) + ") {\n"
        + '#line 1 "source"\n' + rewrite_threadgroup(kernel, "source", source) + "\n}\n"
        + '#line 1 "entry"\n'
        + f"extern \"C\" const msl_kernel_desc msl_kernel = {{{len(plist)}, {sync}, {int(sanitize)}}};\n"
        + "extern \"C\" void msl_kernel_thread(void* const* p, const msl_thread_info* t) {\n"
        + "  (void)p; (void)t;\n"
        + f"  msl_body{targs}(" + ", ".join(args) + ");\n}\n"
    )
