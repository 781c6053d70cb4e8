"""Refuse kernel text that could reach the host, before anything is compiled.

The emulator compiles kernel bodies to native code, so a template from outside is
untrusted: it may not use the preprocessor, inline assembly, compiler attributes or
builtins (every reserved `__name`), declare external functions, or call the C library.
Three further walls stand behind this one: the compiled object may only link against
the runtime and libm (toolchain.py), and the kernel runs in a child process with a
system-call filter and resource limits (runtime.cpp, launch.py).
"""

from __future__ import annotations

import re

from .errors import UnsafeKernelError

_TOKENS = re.compile(
    r"(?P<comment>//[^\n]*|/\*.*?\*/)"
    r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*')"
    r"|(?P<directive>^[ \t]*#[^\n]*)"
    r"|(?P<ident>[A-Za-z_]\w*)",
    re.S | re.M,
)

# Loop hints are the one preprocessor use Metal code needs; they cannot do anything.
_ALLOWED_DIRECTIVE = re.compile(r"^\s*#\s*pragma\s+(unroll(\s*\(?\s*\d*\s*\)?)?|clang\s+loop\s+[\w() ]*|GCC\s+unroll\s+\d+)\s*$")

_FORBIDDEN_WORDS = {
    "asm": "inline assembly",
    "_Pragma": "the _Pragma operator",
    "extern": "an external declaration",
    "std": "the C++ standard library",
    "new": "heap allocation",
    "delete": "heap deallocation",
}
_HOST_CALLS = {
    "system", "popen", "pclose", "execl", "execlp", "execle", "execv", "execvp", "execve", "fork", "vfork",
    "clone", "socket", "connect", "bind", "listen", "accept", "send", "recv", "open", "openat", "creat",
    "fopen", "freopen", "fdopen", "fread", "fwrite", "fclose", "unlink", "remove", "rename", "mkdir", "rmdir",
    "chmod", "chown", "kill", "raise", "abort", "exit", "_exit", "atexit", "getenv", "setenv", "putenv",
    "dlopen", "dlsym", "mmap", "munmap", "mprotect", "syscall", "signal", "sigaction", "read", "write",
    "printf", "fprintf", "sprintf", "snprintf", "puts", "malloc", "calloc", "realloc", "free", "alloca",
    "ioctl", "ptrace", "setjmp", "longjmp",
}


def blank_comments_and_strings(text: str) -> str:
    """The text with comments and string literals replaced by spaces (newlines kept)."""
    def blank(m: re.Match) -> str:
        if m.lastgroup in ("comment", "string"):
            return re.sub(r"[^\n]", " ", m.group(0))
        return m.group(0)
    return _TOKENS.sub(blank, text)


def check(kernel: str, part: str, text: str) -> None:
    """Raise UnsafeKernelError naming the first forbidden construct in `text`."""
    for m in _TOKENS.finditer(text):
        kind, tok = m.lastgroup, m.group(0)
        line = text.count("\n", 0, m.start()) + 1
        where = f"kernel '{kernel}', {part} line {line}"
        if kind == "directive":
            if not _ALLOWED_DIRECTIVE.match(tok):
                raise UnsafeKernelError(
                    f"[emulator] {where}: preprocessor directive '{tok.strip()}' is not allowed "
                    "(kernel text is data: no #include, #define or other directives)")
        elif kind == "ident":
            if tok.startswith("__"):
                raise UnsafeKernelError(
                    f"[emulator] {where}: '{tok}' is not allowed (reserved compiler names: "
                    "builtins, attributes, assembly)")
            if _FORBIDDEN_WORDS.get(tok):
                raise UnsafeKernelError(f"[emulator] {where}: '{tok}' ({_FORBIDDEN_WORDS[tok]}) is not allowed")
            if tok in ("gnu", "clang") and re.match(r"\s*::", text[m.end():]):
                raise UnsafeKernelError(f"[emulator] {where}: compiler attribute '{tok}::' is not allowed")
            if tok in _HOST_CALLS and re.match(r"\s*\(", text[m.end():]):
                raise UnsafeKernelError(
                    f"[emulator] {where}: call to '{tok}' is outside the Metal/MLX surface")


_CUDA_DIRECTIVE = re.compile(
    r"^\s*#\s*(pragma\s+unroll(\s*\d+)?|include\s*<(mma\.h|cuda_fp16\.h|cuda_bf16\.h|cuda_fp8\.h|"
    r"cuda/pipeline|cuda/barrier|cuda/std/\w+|cooperative_groups\.h|cooperative_groups/\w+\.h)>)\s*$")


def check_cuda(kernel: str, text: str) -> None:
    """CUDA templates: device code cannot reach the host, but only CUDA's own headers
    may be included, and no host library call may appear."""
    for m in _TOKENS.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.lastgroup == "directive" and not _CUDA_DIRECTIVE.match(m.group(0)):
            raise UnsafeKernelError(f"[guard] {kernel}, line {line}: directive '{m.group(0).strip()}' is not allowed "
                                    "(only #pragma unroll and CUDA's own headers)")
        if m.lastgroup == "ident" and m.group(0) in _HOST_CALLS - {"printf"} and re.match(r"\s*\(", text[m.end():]):
            raise UnsafeKernelError(f"[guard] {kernel}, line {line}: call to '{m.group(0)}' is not kernel code")
