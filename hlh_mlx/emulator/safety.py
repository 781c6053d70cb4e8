"""Kernel text on its way to the compiler: what the preprocessor may do, and friendly errors.

The security boundary is NOT here. Kernel code runs only inside a locked-down process
(runtime.cpp: seccomp allow-list, no_new_privs, namespaces, rlimits, loaded after the
lockdown), and that holds with every check in this file switched off.

What this file does:

- `prepare` (always on: it is what keeps the *compiler* from reading files the kernel
  text names). It lexes the text as the C++ preprocessor does (line splices, comments,
  string literals, digraphs) and decides every directive: the Metal standard headers
  (`#include <metal_stdlib>` ...) become blank lines, because the prelude already is
  Metal's standard library; loop and diagnostic pragmas become blank lines; `#define`,
  `#undef`, `#if`/`#ifdef`/`#elif`/`#else`/`#endif`, `#error` and `#warning` pass;
  everything else (`#include` of anything else, `#line`, other pragmas ...) is refused.
  Raw string literals and trigraphs are refused: nothing in Metal needs them, and they
  are where a lexer and the compiler could disagree. Behind it the compiler itself
  poisons `asm` and `__has_include` and defines `_Pragma(x)` away (codegen.POISON),
  and never quotes a line of any file in a diagnostic.
- `check` (friendly errors, can be switched off with FRIENDLY_CHECKS): names host calls,
  inline assembly, `extern` declarations and constructor attributes at their line,
  rather than letting the kernel die of SIGSYS in its sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UnsafeKernelError

# Tests switch this off to prove that containment holds without any friendly check.
FRIENDLY_CHECKS = True

METAL_HEADERS = frozenset({
    "metal_stdlib", "metal_math", "metal_simdgroup", "metal_simdgroup_matrix", "metal_atomic", "metal_compute",
    "metal_common", "metal_integer", "metal_relational", "metal_geometric", "metal_types", "metal_pack",
    "metal_limits", "metal_numeric", "metal_integer_math", "metal_matrix", "metal_array", "metal_type_traits",
    "metal_utility", "metal_functional", "metal_uniform", "metal_interpolate", "metal_bfloat", "metal_logging",
    "metal_tensor", "metal_graphics", "metal_texture", "metal_extended_types",
})
_PASS_DIRECTIVES = frozenset({"define", "undef", "if", "ifdef", "ifndef", "elif", "elifdef", "elifndef", "else",
                              "endif", "error", "warning", ""})
# pragmas that only hint or silence: dropped (the line stays, blank)
_DROPPED_PRAGMA = re.compile(
    r"^\s*(unroll\b.*|nounroll\b.*|once\s*|clang\s+(loop|diagnostic|unroll|nounroll)\b.*|GCC\s+(unroll|diagnostic)\b.*"
    r"|METAL\b.*|STDC\s+FP_CONTRACT\b.*)$", re.S)
_INCLUDE = re.compile(r"^\s*<\s*([\w./]+)\s*>\s*$|^\s*\"([\w./]+)\"\s*$")

_IDENT = re.compile(r"[A-Za-z_]\w*")
# a pp-number exactly as C++ has it: a digit separator ' only before a digit or identifier
# character (`1'` followed by anything else ends the number, and ' starts a literal)
_NUMBER = re.compile(r"\.?\d(?:[eEpP][+-]|'[0-9A-Za-z_]|[\w.])*")
_STRING_PREFIX = re.compile(r"(u8|u|U|L)?R?$")


# The compiler ignores NUL and ends a line at a lone carriage return: text must not
# look different to it and to the lexer below.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def normalize(text: str) -> str:
    """Line ends as the compiler sees them: CR LF and a lone CR are newlines."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class Token:
    kind: str       # ident | number | string | punct | directive
    text: str
    line: int       # line in the original text (1-based)
    last: int = 0   # directives: the original line they end on
    start: int = 0  # offsets in the (normalized) original text: [start, end)
    end: int = 0


class _Lexer:
    """Translation phases 1-3 of C++ on kernel text, line numbers kept."""

    def __init__(self, kernel: str, part: str, text: str):
        self.kernel, self.part = kernel, part
        text = normalize(text)
        bad = _CONTROL.search(text)
        if bad:
            line = text.count("\n", 0, bad.start()) + 1
            raise UnsafeKernelError(f"[emulator] kernel '{kernel}', {part} line {line}: control character "
                                    f"{bad.group(0)!r} is not allowed in kernel text")
        # phase 2: remove line splices (GCC also accepts spaces between the backslash and
        # the newline); remember the original line of every remaining character
        chars, lines, offsets = [], [], []
        line, i, n = 1, 0, len(text)
        while i < n:
            c = text[i]
            if c == "\\":
                j = i + 1
                while j < n and text[j] in " \t\f\v":
                    j += 1
                if j < n and text[j] == "\n":
                    line += 1
                    i = j + 1
                    continue
            chars.append(c)
            lines.append(line)
            offsets.append(i)
            if c == "\n":
                line += 1
            i += 1
        self.s = "".join(chars)
        self.lines = lines
        self.offsets = offsets + [n]
        self.nlines = line

    def fail(self, pos_or_line: int, what: str, *, is_line: bool = False):
        line = pos_or_line if is_line else (self.lines[pos_or_line] if pos_or_line < len(self.lines) else self.nlines)
        raise UnsafeKernelError(f"[emulator] kernel '{self.kernel}', {self.part} line {line}: {what}")

    def _span(self, tok: Token, i: int, j: int) -> Token:
        """tok with its [start, end) in the original text (chars i..j-1 of the lexed text)."""
        tok.start, tok.end = self.offsets[i], self.offsets[j - 1] + 1
        return tok

    def tokens(self, comments: bool = False) -> list[Token]:
        """The tokens (with `comments`, comments too, as kind "comment")."""
        s, n = self.s, len(self.s)
        out: list[Token] = []
        i = 0
        line_start = True  # only whitespace and comments since the last newline
        while i < n:
            c = s[i]
            if c == "\n":
                line_start = True
                i += 1
                continue
            if c in " \t\f\v":
                i += 1
                continue
            if s.startswith("//", i):
                j = s.find("\n", i)
                j = n if j < 0 else j
                if comments:
                    out.append(self._span(Token("comment", s[i:j], self.lines[i]), i, j))
                i = j
                continue
            if s.startswith("/*", i):
                j = s.find("*/", i + 2)
                if j < 0:
                    self.fail(i, "unterminated comment")
                if comments:
                    out.append(self._span(Token("comment", s[i:j + 2], self.lines[i]), i, j + 2))
                i = j + 2
                continue
            if s.startswith("??", i) and i + 2 < n and s[i + 2] in "=/'()!<>-":
                self.fail(i, f"trigraph '{s[i:i + 3]}' is not allowed")
            if line_start and (c == "#" or s.startswith("%:", i)):
                start = i
                end = self._directive_end(i + (1 if c == "#" else 2))
                out.append(self._span(Token("directive", s[start:end], self.lines[start], self.lines[end - 1]),
                                      start, end))
                i = end
                line_start = False
                continue
            line_start = False
            m = _IDENT.match(s, i)
            if m:
                word = m.group(0)
                j = m.end()
                if j < n and s[j] in "\"'" and _STRING_PREFIX.fullmatch(word):
                    if "R" in word and s[j] == '"':
                        self.fail(i, "raw string literals are not allowed")
                    i = self._quoted(j, s[j])
                    out.append(self._span(Token("string", s[m.start():i], self.lines[m.start()]), m.start(), i))
                    continue
                out.append(self._span(Token("ident", word, self.lines[i]), i, j))
                i = j
                continue
            m = _NUMBER.match(s, i)
            if m:
                out.append(self._span(Token("number", m.group(0), self.lines[i]), i, m.end()))
                i = m.end()
                continue
            if c in "\"'":
                j = self._quoted(i, c)
                out.append(self._span(Token("string", s[i:j], self.lines[i]), i, j))
                i = j
                continue
            out.append(self._span(Token("punct", c, self.lines[i]), i, i + 1))
            i += 1
        return out

    def _quoted(self, i: int, q: str) -> int:
        s, n = self.s, len(self.s)
        j = i + 1
        while j < n and s[j] != q:
            if s[j] == "\n":
                self.fail(i, "unterminated string or character literal")
            j += 2 if s[j] == "\\" else 1
        if j >= n:
            self.fail(i, "unterminated string or character literal")
        return j + 1

    def _directive_end(self, i: int) -> int:
        """End of a directive starting before i: the next newline outside a comment."""
        s, n = self.s, len(self.s)
        while i < n and s[i] != "\n":
            if s.startswith("/*", i):
                j = s.find("*/", i + 2)
                if j < 0:
                    self.fail(i, "unterminated comment")
                i = j + 2
            elif s.startswith("//", i):
                j = s.find("\n", i)
                return n if j < 0 else j
            elif s[i] in "\"'":
                j = i + 1
                while j < n and s[j] not in (s[i], "\n"):
                    j += 2 if s[j] == "\\" else 1
                i = j + 1 if j < n and s[j] == s[i] else j
            else:
                i += 1
        return i


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def _directive(tok: Token) -> tuple[str, str]:
    """(name, rest) of a directive token (`#` or `%:` already first)."""
    body = _strip_comments(tok.text[1:] if tok.text.startswith("#") else tok.text[2:])
    m = re.match(r"\s*([A-Za-z_]\w*)?(.*)$", body, re.S)
    return (m.group(1) or ""), m.group(2).strip()


def prepare(kernel: str, part: str, text: str) -> str:
    """The text the compiler may see: every directive decided (see the module docstring).

    Line numbers are kept: a dropped directive leaves its lines blank.
    """
    text = normalize(text)  # what the compiler gets is exactly what was lexed
    lex = _Lexer(kernel, part, text)
    blank: list[tuple[int, int]] = []  # [start, end) in the text of dropped directives
    for tok in lex.tokens():
        if tok.kind != "directive":
            continue
        name, rest = _directive(tok)
        where = f"[emulator] kernel '{kernel}', {part} line {tok.line}"
        if name in ("include", "include_next", "import", "embed"):
            m = _INCLUDE.match(rest)
            header = (m.group(1) or m.group(2)) if m else None
            if header and header.removesuffix(".h") in METAL_HEADERS:
                blank.append((tok.start, tok.end))
                continue
            raise UnsafeKernelError(
                f"{where}: '#{name} {rest}' is not allowed: kernel text may include only Metal's standard "
                "headers (<metal_stdlib>, <metal_simdgroup>, ...), which the emulator provides; put helper "
                "code in `header=`")
        if name == "pragma":
            if _DROPPED_PRAGMA.match(rest):
                blank.append((tok.start, tok.end))
                continue
            raise UnsafeKernelError(f"{where}: '#pragma {rest}' is not allowed (only loop-unrolling and "
                                    "diagnostic pragmas, which the emulator ignores)")
        if name == "" and rest:
            raise UnsafeKernelError(f"{where}: malformed directive '{tok.text.strip()[:60]}' (a directive name "
                                    "must follow '#')")
        if name not in _PASS_DIRECTIVES:
            raise UnsafeKernelError(f"{where}: directive '#{name}' is not allowed (allowed: #include of Metal "
                                    "headers, #define, #undef, #if/#ifdef/#ifndef/#elif/#else/#endif, "
                                    "#pragma unroll, #error, #warning)")
    if not blank:
        return text
    # only the directive itself, from its `#` to its end (newlines kept): what precedes the
    # `#` on its line (the end of a comment begun before) stays
    pieces, pos = [], 0
    for start, end in blank:
        pieces.append(text[pos:start])
        pieces.append(re.sub(r"[^\n]", " ", text[start:end]))
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


# ---------------------------------------------------------------- friendly errors
_FORBIDDEN_WORDS = {
    "asm": "inline assembly", "__asm": "inline assembly", "__asm__": "inline assembly",
    "__has_include": "__has_include", "__has_include_next": "__has_include",
    "extern": "an external declaration",
    "std": "the C++ standard library (Metal has none; use metal::)",
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
# in a #define: attributes (any spelling), asm, and pasting or stringising (which build any name)
_MACRO_HIDES = re.compile(r"^\s*#\s*define\b.*(__attribute|__declspec|\[\s*\[|<:\s*<:|%:|\basm\b|__asm|##|#\s*\w)",
                          re.S)
_INIT_ATTRS = {"constructor", "destructor", "init_priority", "ifunc", "section", "alias", "weakref", "symver"}


def check(kernel: str, part: str, text: str) -> None:
    """Raise UnsafeKernelError naming the first construct that reaches for the host.

    Friendly only (FRIENDLY_CHECKS): the sandbox would stop each of these anyway.
    """
    if not FRIENDLY_CHECKS:
        return
    every = list(_Lexer(kernel, part, text).tokens())
    for t in every:
        # a macro could spell an attribute (or a name the checks below refuse) the token
        # checks never see: `#define AT __attribute__` (a red team planted assembler
        # directives that way with the checks on)
        if t.kind == "directive" and _MACRO_HIDES.search(t.text):
            raise UnsafeKernelError(f"[emulator] kernel '{kernel}', {part} line {t.line}: a macro may not spell a "
                                    "compiler attribute, `asm` or token pasting of names")
    toks = [t for t in every if t.kind != "directive"]
    in_attr = _attribute_tokens(toks)
    for k, tok in enumerate(toks):
        if tok.kind == "string" and k in in_attr:
            # an attribute's string reaches the assembler as it is (symver, section, alias,
            # asm labels...): Metal's attributes take none
            raise UnsafeKernelError(f"[emulator] kernel '{kernel}', {part} line {tok.line}: a string in a "
                                    "compiler attribute is not allowed")
        if tok.kind != "ident":
            continue
        where = f"[emulator] kernel '{kernel}', {part} line {tok.line}"
        nxt = toks[k + 1].text if k + 1 < len(toks) else ""
        prev = toks[k - 1].text if k else ""
        # x.read(), metal::abs(), or a declaration (float read(int i)) rather than a call
        member = prev in (".", ">") or (prev == ":" and k > 1 and toks[k - 2].text == ":") or (
            k and toks[k - 1].kind == "ident" and prev not in ("return", "else", "do", "case", "co_return"))
        if tok.text in _FORBIDDEN_WORDS:
            raise UnsafeKernelError(f"{where}: '{tok.text}' ({_FORBIDDEN_WORDS[tok.text]}) is not allowed")
        if tok.text in _HOST_CALLS and nxt == "(" and not member:
            raise UnsafeKernelError(f"{where}: call to '{tok.text}' is outside the Metal/MLX surface")
        if tok.text in _INIT_ATTRS and k in in_attr:
            raise UnsafeKernelError(f"{where}: attribute '{tok.text}' is not allowed (Metal has no constructors, "
                                    "sections or aliases)")
        if tok.text == "using" and k in in_attr:
            raise UnsafeKernelError(f"{where}: compiler attribute namespace '[[using ...]]' is not allowed")
        if tok.text in ("gnu", "clang") and k in in_attr and nxt == ":" and k + 2 < len(toks) and toks[k + 2].text == ":":
            raise UnsafeKernelError(f"{where}: compiler attribute '{tok.text}::' is not allowed")


def _attribute_tokens(toks: list[Token]) -> set[int]:
    """Indices of tokens inside `__attribute__((...))` or `[[...]]`."""
    inside: set[int] = set()
    k = 0
    while k < len(toks):
        t = toks[k].text
        if t in ("__attribute__", "__attribute") and k + 1 < len(toks) and toks[k + 1].text == "(":
            depth, j = 0, k + 1
            while j < len(toks):
                depth += {"(": 1, ")": -1}.get(toks[j].text, 0)
                inside.add(j)
                if depth == 0:
                    break
                j += 1
            k = j
        elif t == "[" and k + 1 < len(toks) and toks[k + 1].text == "[":
            j = k + 2
            while j + 1 < len(toks) and not (toks[j].text == "]" and toks[j + 1].text == "]"):
                inside.add(j)
                j += 1
            k = j
        k += 1
    return inside


def blank_comments_and_strings(text: str, kernel: str = "", part: str = "") -> str:
    """The text with comments and string literals replaced by spaces (newlines kept), as
    the compiler's lexer (prepare's) reads them. Text it refuses (UnsafeKernelError)
    raises when `kernel` is given; otherwise (heuristics only) a regex reading is used."""
    try:
        toks = _Lexer(kernel, part, text).tokens(comments=True)
    except UnsafeKernelError:
        if kernel:
            raise
        return _regex_blank(text)
    text = normalize(text)
    pieces, pos = [], 0
    for t in toks:
        if t.kind in ("comment", "string"):
            pieces.append(text[pos:t.start])
            pieces.append(re.sub(r"[^\n]", " ", text[t.start:t.end]))
            pos = t.end
    pieces.append(text[pos:])
    return "".join(pieces)


def _regex_blank(text: str) -> str:
    def blank(m: re.Match) -> str:
        if m.lastgroup in ("comment", "string"):
            return re.sub(r"[^\n]", " ", m.group(0))
        return m.group(0)
    return _TOKENS.sub(blank, text)


_TOKENS = re.compile(
    r"(?P<comment>//[^\n]*|/\*.*?\*/)"
    r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*')",
    re.S,
)

_CUDA_DIRECTIVE = re.compile(
    r"^\s*#\s*(pragma\s+unroll(\s*\d+)?|include\s*<(mma\.h|cuda_fp16\.h|cuda_bf16\.h|cuda_fp8\.h|"
    r"cuda/pipeline|cuda/barrier|cuda/std/\w+|cooperative_groups\.h|cooperative_groups/\w+\.h)>)\s*$")
_CUDA_TOKENS = re.compile(
    r"(?P<comment>//[^\n]*|/\*.*?\*/)"
    r"|(?P<string>\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*')"
    r"|(?P<directive>^[ \t]*#[^\n]*)"
    r"|(?P<ident>[A-Za-z_]\w*)",
    re.S | re.M,
)


def check_cuda(kernel: str, text: str) -> None:
    """CUDA templates: device code cannot reach the host, but only CUDA's own headers
    may be included, and no host library call may appear."""
    for m in _CUDA_TOKENS.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.lastgroup == "directive" and not _CUDA_DIRECTIVE.match(m.group(0)):
            raise UnsafeKernelError(f"[guard] {kernel}, line {line}: directive '{m.group(0).strip()}' is not allowed "
                                    "(only #pragma unroll and CUDA's own headers)")
        if m.lastgroup == "ident" and m.group(0) in _HOST_CALLS - {"printf"} and re.match(r"\s*\(", text[m.end():]):
            raise UnsafeKernelError(f"[guard] {kernel}, line {line}: call to '{m.group(0)}' is not kernel code")
