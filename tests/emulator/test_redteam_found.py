"""Red team, holes found: each test reproduces one escape minimally and asserts that
nothing happened outside. They FAIL today; each passes once its hole is closed.

- kernel text reaching the compiler past safety.prepare (lexer disagreements), so that
  `#include` of any file runs and its content leaks into the kernel's output or into a
  compiler message;
- names (template parameter names, input and output names) pasted unchecked into the
  generated C++ and into the launcher's spec, where a newline starts a new spec line
  (`file PATH` makes the launcher map and write any file the user can write);
- the compile stage has no time (or memory) limit;
- template rendering: single calls/operators that allocate or compute without bound, and
  header expressions evaluated with no budget at all.
"""

from __future__ import annotations

import os
import platform
import secrets
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator, templates
from hlh_mlx.emulator import EmulatorError

REPO = str(Path(__file__).parents[2])


@pytest.fixture
def secret_file(tmp_path):
    """A file whose content (one identifier) must never reach a kernel's output or an error."""
    secret = "SECRET_" + secrets.token_hex(8)
    path = tmp_path / "secret.h"
    path.write_text(secret + "\n")
    return path, secret


def _run_u8(k, n=96, template=None):
    (y,) = k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(n,)],
             output_dtypes=[mx.uint8], init_value=0, template=template)
    return bytes(np.asarray(y))


def _assert_no_leak(make, secret):
    """Build and run the kernel; the secret must appear nowhere (refusal is fine)."""
    try:
        out = _run_u8(make())
    except (EmulatorError, ValueError) as e:
        text = str(e) + str(getattr(e, "log", ""))
        assert secret not in text, f"the file's content leaked into an error message: {text[:300]}"
        return
    assert secret.encode() not in out, f"the file's content leaked into the kernel output: {out.rstrip(bytes(1))!r}"


# The included file declares a struct named by its content; __PRETTY_FUNCTION__ spells the name
# into the output. (A compile error naming the type leaks it through the diagnostic instead.)
LEAK_TAIL = ("struct\n#include \"{path}\"\n{{}} leak_v;\n// */\n"
             "template <class T> const char* leak_name() {{ return __PRETTY_FUNCTION__; }}\n")
LEAK_BODY = "const char* s = leak_name<decltype(leak_v)>(); for (int i = 0; i < 96 && s[i]; i++) out[i] = s[i];"


def test_digit_separator_hides_an_include_from_the_lexer(secret_file):
    """safety._NUMBER takes `1'` as one number, so the lexer sees `/*` open a comment; the
    compiler ends the number at `1` (a digit separator needs a digit or letter after it)
    and reads `' /*'` as a character literal, so the "commented" #include runs."""
    path, secret = secret_file
    header = "#define IGN(...)\nIGN(1' /*')\n" + LEAK_TAIL.format(path=path)
    _assert_no_leak(lambda: emulator.metal_kernel("sep_leak", ["inp"], ["out"], LEAK_BODY, header=header), secret)


def test_threadgroup_rewrite_reopens_a_hidden_include(secret_file):
    """prepare() sees `1'0` (a number) and then a /* comment hiding the #include;
    codegen.rewrite_threadgroup's regex lexer sees `'0 /* '` as a character literal,
    matches the declaration across it and replaces it, deleting the `/*`."""
    path, secret = secret_file
    header = "threadgroup float buf[1'0 /* '];\n" + LEAK_TAIL.format(path=path)
    _assert_no_leak(lambda: emulator.metal_kernel("tg_leak", ["inp"], ["out"], LEAK_BODY, header=header), secret)


def test_threadgroup_rewrite_leaks_a_file_through_a_diagnostic(secret_file):
    path, secret = secret_file
    header = ("threadgroup float buf[1'0 /* '];\nstruct\n#include \"%s\"\n{} leak_v;\n// */\n"
              "template <class T> struct Show;\nShow<decltype(leak_v)> shown;\n" % path)
    _assert_no_leak(lambda: emulator.metal_kernel("tg_diag", ["inp"], ["out"], "out[0] = 1;", header=header),
                    secret)


def test_template_parameter_name_is_pasted_into_the_cpp(secret_file):
    """Only template *values* are checked (codegen.template_value); the name goes into
    `template <int NAME>` as is, newline and directives included."""
    path, secret = secret_file
    name = "N> struct Pad;\n" + LEAK_TAIL.format(path=path).replace("// */\n", "") + "template <int M"
    k = emulator.metal_kernel("tname_leak", ["inp"], ["out"], LEAK_BODY)
    try:
        out = _run_u8(k, template=[(name, 3)])
    except (EmulatorError, ValueError) as e:
        assert secret not in str(e) + str(getattr(e, "log", ""))
        return
    assert secret.encode() not in out, f"template name injection leaked the file: {out.rstrip(bytes(1))!r}"


@pytest.mark.parametrize("which", ["input", "output"])
def test_a_buffer_name_injects_a_launcher_spec_line(tmp_path, which):
    """Input/output names are unchecked: in the C++ signature `/* ... */` makes the rest
    a comment; in the launcher's spec (launch.run: `param OFF N PTR NAME`) each newline
    starts a line, and `file PATH` makes the launcher map PATH read-write (before its
    lockdown) as the kernel's buffers: the kernel writes into any file the user can write.
    (`memlimit 0` / `cpulimit 0` / `workers N` lift the kernel's limits the same way.)"""
    victim = tmp_path / "victim.txt"
    victim.write_text("A" * 64)
    evil = f"{which[:3]} /*\nfile {victim}\norder */"
    inputs, outputs = (["inp"], [evil]) if which == "output" else ([evil], ["out"])
    body = f"for (int i = 0; i < 8; i++) {'out' if which == 'input' else 'out'}[i] = 'X';"
    try:
        k = emulator.metal_kernel("spec_inject", inputs, outputs, body)
        k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(8,)],
          output_dtypes=[mx.uint8])
    except (EmulatorError, ValueError):
        pass
    assert victim.read_text() == "A" * 64, f"the kernel wrote into a file it named: {victim.read_text()!r}"


def test_compilation_stops_at_the_timeout(tmp_path):
    """g++ runs with no time limit (toolchain.build_kernel: subprocess.run without timeout
    or rlimits): constant expressions, each under g++'s per-evaluation limits, add up
    without bound. HLH_MLX_EMU_TIMEOUT does not apply; the caller hangs."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {REPO!r})
        import mlx.core as mx
        from hlh_mlx import emulator
        hdr = ("constexpr unsigned long spin(unsigned long n) {{ unsigned long s = n; "
               "for (unsigned long i = 0; i < 1000; i++) for (unsigned long j = 0; j < 1000; j++) "
               "s = s * 6364136223846793005ul + i + j; return s; }}\\n"
               "template <int K> struct Sum {{ static constexpr unsigned long v = spin(K) + Sum<K - 1>::v; }};\\n"
               "template <> struct Sum<0> {{ static constexpr unsigned long v = 0; }};\\n")
        k = emulator.metal_kernel("cbomb_{secrets.token_hex(4)}", ["inp"], ["out"], "out[0] = Sum<400>::v;", header=hdr)
        try:
            k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(4,)],
              output_dtypes=[mx.float32])
        except emulator.EmulatorError as e:
            print(type(e).__name__, e)
    """)
    env = dict(os.environ, HLH_MLX_EMU_TIMEOUT="3")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True,
                              start_new_session=True)
    try:
        out, _ = worker.communicate(timeout=60)  # a 3 s limit, and time to build the runtime
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, 9)
        worker.wait()
        pytest.fail("the compile of a kernel ran past HLH_MLX_EMU_TIMEOUT (3 s) and was still running after 60 s")
    assert "KernelTimeoutError" in out or "time" in out


# ---------------------------------------------------------------- template rendering
HEAD = """{#
[meta]
op = "gelu"
inputs = ["inp"]
outputs = ["out"]
[params]
X = [1]
[constraints]
c = "%s"
[launch]
grid = ["1", "1", "1"]
threadgroup = ["1", "1", "1"]
#}
"""


def _load(tmp_path, body, constraint="X > 0"):
    d = tmp_path / "gelu"
    d.mkdir(exist_ok=True)
    p = d / "evil.metal.j2"
    p.write_text(HEAD % constraint + body)
    return templates.load(p)


@pytest.mark.parametrize("body", [
    '{{ "%200000000d" % 1 }}',                    # `%` is not an intercepted operator
    '{{ ""|center(200000000) }}',                 # filters are not size-checked
    '{{ "".ljust(200000000)|length }}',           # nor str methods
    '{{ "{:>200000000}".format(1)|length }}',     # nor format widths
    '{% set x = [0] %}{% for i in range(25) %}{{ x.extend(x) or "" }}{% endfor %}{{ x|length }}',  # 2**25 items
], ids=["percent-format", "center-filter", "ljust-method", "format-width", "list-doubling"])
def test_a_render_never_builds_a_value_past_the_size_limit(tmp_path, body):
    """MAX_RENDER_CHARS bounds only `*`/`+` results and the final text: one call or `%`
    allocates any size first (the sizes here are 200 MB; 20 GB works the same). Jinja's
    optimizer even evaluates constant `%` and filter calls inside load(), with no budget."""
    tracemalloc.start()
    try:
        try:  # Jinja folds constant expressions while it compiles: load() is measured too
            _load(tmp_path, body).render({"X": 1})
        except templates.TemplateError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"rendering allocated {peak >> 20} MB (MAX_RENDER_CHARS is {templates.MAX_RENDER_CHARS})"


@pytest.mark.parametrize("body", [
    "{{ ((10**256)**256)**150 > 1 }}",             # every `**` passes the right <= 256 check; 4 levels: hours
    "{{ lipsum(n=50000, html=False)|length }}",    # Jinja's default global, one call, no step budget
], ids=["power-tower", "lipsum"])
def test_one_expensive_operation_is_stopped_at_the_render_time_limit(tmp_path, monkeypatch, body):
    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.5)
    start = time.monotonic()
    try:
        _load(tmp_path, body).render({"X": 1})
    except templates.TemplateError:
        pass
    assert time.monotonic() - start < 3, f"the render ran {time.monotonic() - start:.1f} s (limit 0.5 s)"


def test_header_expressions_are_bounded_too(tmp_path, monkeypatch):
    """Constraints, grid, threadgroup and template_args expressions (templates.Expr) run
    with no budget at all: _BUDGET.deadline is None outside render()."""
    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.5)
    t = _load(tmp_path, "out[0] = 1;\n",
              constraint="(range(40000)|select('in', range(40000)|list)|list|length) > 0")  # ~10 s; 10**5: hours
    start = time.monotonic()
    try:
        t.constraints["c"](X=1)
    except (templates.TemplateError, templates.RenderLimit):
        pass
    assert time.monotonic() - start < 3, f"a header expression ran {time.monotonic() - start:.1f} s"


# ---------------------------------------------------------------- export
EXPORT_TEMPLATE = '''{#
[meta]
op = "gelu"
inputs = ["x"]
outputs = ["y"]
summary = """gelu.\\"\\"\\"
open(%r, "w").write("ran at import")
def _pad():
    \\"\\"\\" """
[params]
A = [1]
[launch]
grid = ["N", "1", "1"]
threadgroup = ["1", "1", "1"]
[template_args]
T = "dtype"
#}
uint i = thread_position_in_grid.x;
y[i] = x[i];
'''


def test_export_never_turns_template_text_into_python_code(tmp_path, monkeypatch):
    """export.render_module pastes [meta] summary into a docstring (and input names into
    `def op(...)` and expressions) as is: `\"\"\"` in a pulled template's summary ends the
    docstring, and what follows runs when the exported module is imported, unsandboxed."""
    from hlh_mlx import export, variants

    marker = tmp_path / "pwned"
    root = tmp_path / "templates"
    (root / "gelu").mkdir(parents=True)
    path = root / "gelu" / "evilexp.metal.j2"
    path.write_text(EXPORT_TEMPLATE % str(marker))
    monkeypatch.setenv("HLH_MLX_TEMPLATES", str(root))
    vid = variants.expand(templates.load(path))[0].id
    try:
        text = export.render_module("gelu", vid)
    except (ValueError, templates.TemplateError):
        return  # refused: fine
    module = tmp_path / "exported_kernel.py"
    module.write_text(text)
    subprocess.run([sys.executable, "-c", "import exported_kernel"], cwd=tmp_path, capture_output=True, timeout=120)
    assert not marker.exists(), "importing the exported module ran code from the template's summary"


# ---------------------------------------------------------------- threads
# Native kernel code needs no symbol to reach libc: from msl_rt_lane (an allowed symbol)
# to the launcher's ELF header, its DT_DEBUG entry, the loader's r_debug list, and libc's
# own symbol table. (The link check is a friendly check; the sandbox is the boundary.)
THREADS_HEADER = r'''
struct E64 { unsigned char ident[16]; unsigned short type, machine; unsigned version; unsigned long entry, phoff, shoff;
             unsigned flags; unsigned short ehsize, phentsize, phnum, shentsize, shnum, shstrndx; };
struct P64 { unsigned type, flags; unsigned long offset, vaddr, paddr, filesz, memsz, align; };
struct D64 { long tag; unsigned long val; };
struct S64 { unsigned name; unsigned char info, other; unsigned short shndx; unsigned long value, size; };
static bool same(const char* a, const char* b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }
struct LM { unsigned long addr; const char* name; const D64* ld; LM* next; LM* prev; };
struct RD { int version; LM* map; };
static const unsigned char* elf_base(unsigned long p) {
  p &= ~4095ul;
  while (!(((const unsigned char*)p)[0] == 0x7f && ((const unsigned char*)p)[1] == 'E' &&
           ((const unsigned char*)p)[2] == 'L' && ((const unsigned char*)p)[3] == 'F')) p -= 4096;
  return (const unsigned char*)p;
}
static bool has(const char* s, const char* sub) {
  for (; *s; s++) { const char* a = s; const char* b = sub; while (*a && *a == *b) { a++; b++; } if (!*b) return true; }
  return false;
}
// the launcher (found from msl_rt_lane, an allowed symbol) -> DT_DEBUG -> r_debug -> libc's link_map
static void* libc_sym(const char* want) {
  unsigned long (*f)() = (unsigned long (*)())(void*)msl_rt_lane;
  unsigned long p = (unsigned long)elf_base((unsigned long)(void*)f);
  const E64* eh = (const E64*)p;
  const P64* ph = (const P64*)(p + eh->phoff);
  const D64* dyn = 0;
  for (int i = 0; i < eh->phnum; i++) if (ph[i].type == 2) dyn = (const D64*)(p + ph[i].vaddr);
  const RD* rd = 0;
  for (; dyn->tag; dyn++) if (dyn->tag == 21) rd = (const RD*)dyn->val;
  if (!rd) return 0;
  for (LM* m = rd->map; m; m = m->next) {
    if (!m->name || !has(m->name, "libc.so")) continue;
    unsigned long symtab = 0, strtab = 0;
    for (const D64* d = m->ld; d->tag; d++) { if (d->tag == 6) symtab = d->val; if (d->tag == 5) strtab = d->val; }
    if (symtab < m->addr) symtab += m->addr;
    if (strtab < m->addr) strtab += m->addr;
    for (const S64* s = (const S64*)symtab + 1; (unsigned long)s < strtab; s++)
      if (s->value && same((const char*)(strtab + s->name), want)) return (void*)(m->addr + s->value);
  }
  return 0;
}
static volatile int started;
static unsigned (*g_sleep)(unsigned);
static void* spin(void*) { __atomic_fetch_add(&started, 1, __ATOMIC_SEQ_CST); for (;;) g_sleep(100); return 0; }
'''
THREADS_BODY = r'''
typedef int (*pc_t)(unsigned long*, const void*, void* (*)(void*), void*);
pc_t pc = (pc_t)libc_sym("pthread_create");
if (!pc) { out[0] = -1; return; }
g_sleep = (unsigned (*)(unsigned))libc_sym("sleep");
for (int k = 0; k < %d; k++) { unsigned long t; if (pc(&t, 0, spin, 0) != 0) break; }
for (int w = 0; w < 100000000 && started < %d; w++) {}
for (int w = 0; w < 3; w++) g_sleep(1);
out[0] = started;
'''


def test_a_kernel_cannot_start_threads_without_bound():
    """The allow-list lets clone(CLONE_THREAD) through with no count and the launcher sets
    no RLIMIT_NPROC (nor a pids cgroup): a kernel starts as many threads as its memory
    limit allows stacks (16 GiB / 8 MiB here; small stacks: millions), each one a pid
    of the host (pid_max is 32768 on many machines): every fork on the host fails until
    the timeout. Here 300, sleeping."""
    n = 300
    k = emulator.metal_kernel("thread_flood", ["inp"], ["out"], THREADS_BODY % (n, n), header=THREADS_HEADER)
    try:
        (y,) = k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                 output_dtypes=[mx.int32])
    except (EmulatorError, ValueError):
        return  # stopped: fine
    started = int(np.asarray(y)[0])
    assert started < 64, f"the kernel started {started} threads of its own"


ENV_BODY = r'''
char*** env = (char***)libc_sym("environ");
int o = 0;
if (env) for (char** e = *env; *e && o < 4000; e++) for (const char* c = *e; *c && o < 4000; c++) out[o++] = *c;
'''


def test_the_kernel_process_does_not_inherit_the_callers_environment(monkeypatch):
    """launch.run starts the launcher with this process's whole environment (Popen without
    env=): tokens (HF_TOKEN, cloud keys) sit in the kernel's own memory, and a kernel
    copies them into its outputs."""
    secret = "tok_" + secrets.token_hex(8)
    monkeypatch.setenv("HLH_REDTEAM_TOKEN", secret)
    k = emulator.metal_kernel("env_leak", ["inp"], ["out"], ENV_BODY, header=THREADS_HEADER)
    try:
        (y,) = k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(4096,)],
                 output_dtypes=[mx.uint8], init_value=0)
    except (EmulatorError, ValueError):
        return
    assert secret.encode() not in bytes(np.asarray(y)), "an environment variable of the caller leaked into the output"


ESC_BODY = r'''
long (*wr)(int, const void*, unsigned long) = (long (*)(int, const void*, unsigned long))libc_sym("write");
void (*ex)(int) = (void (*)(int))libc_sym("_exit");
const char msg[] = "\x1b[2J\x1b[H\x1b]52;c;cHduZWQ=\x07guard: 0 finding(s)\n";
wr(2, msg, sizeof(msg) - 1);
ex(5);
'''


def test_error_messages_carry_no_terminal_control_sequences():
    """launch._check quotes the kernel process's stderr in the error ("failed (exit N): ..."),
    raw: a kernel clears the user's screen, prints a fake verdict, or sets the clipboard
    (OSC 52) when the message is shown. msl_rt_fault(kind, what) similarly lets kernel code
    pick the error class and text ("was not run: ...", multi-line)."""
    k = emulator.metal_kernel("escape_seq", ["inp"], ["out"], ESC_BODY, header=THREADS_HEADER)
    with pytest.raises(Exception) as e:
        k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(4,)],
          output_dtypes=[mx.float32])
    bad = [c for c in str(e.value) if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0]
    assert not bad, f"the error message carries control characters from the kernel: {bad[:8]!r}"


def test_blanking_a_metal_include_keeps_the_end_of_a_comment(secret_file):
    """prepare() blanks every line a dropped directive touches, from the line of its `#`:
    here also the `*/` that closes a comment begun on the line before. The compiler's
    comment then runs on to the `*/` inside a string, `//` hides the `/*` that prepare
    sees open a comment, and the #include prepare thinks is commented out runs."""
    path, secret = secret_file
    header = ('/* x\n*/ #include <metal_stdlib>\n"*/ // " /*\n' + LEAK_TAIL.format(path=path))
    _assert_no_leak(lambda: emulator.metal_kernel("blank_leak", ["inp"], ["out"], LEAK_BODY, header=header), secret)


# An attribute's string reaches the assembler verbatim: its newlines start directives of the
# kernel text's choosing (found by a red team, 2026-12-04). `.incbin` reads a host file into
# the object at compile time; with the text checks off, only the toolchain's confinement
# (confine.py: the compile step reads the system's tools and the runtime alone) stops it.
SYMVER_HEADER = ('__attribute__((symver("leakfn@V1\\n.local _Z6leakfnv\\n.incbin \\"{path}\\"\\n.byte 0\\n"))) '
                 'int leakfn() {{ return 1; }}\n')
SYMVER_BODY = ("const uchar* p = reinterpret_cast<const uchar*>(&leakfn); "
               "for (uint k = 0; k < 96; k++) out[k] = p[k];")


@pytest.mark.parametrize("friendly", [True, False], ids=["friendly", "no-text-checks"])
def test_an_attribute_string_cannot_make_the_assembler_read_a_host_file(secret_file, friendly, monkeypatch):
    from hlh_mlx.emulator import safety
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", friendly)
    path, secret = secret_file
    header = SYMVER_HEADER.format(path=path)
    _assert_no_leak(lambda: emulator.metal_kernel("symver_leak", ["inp"], ["out"], SYMVER_BODY, header=header),
                    secret)
    if friendly:  # named before anything runs
        with pytest.raises(EmulatorError, match="attribute 'symver' is not allowed"):
            emulator.metal_kernel("symver_leak", ["inp"], ["out"], SYMVER_BODY, header=header)
        for attribute in ('optimize("O0")', 'deprecated("no")', 'target("avx2")'):  # any string, any attribute
            with pytest.raises(EmulatorError, match="header line 1: a string in a compiler attribute is not allowed"):
                emulator.metal_kernel("attr_string", ["inp"], ["out"], "out[0] = f();",
                                      header=f"__attribute__(({attribute})) float f() {{ return 1; }}\n")


def test_a_toolchain_step_reads_and_writes_nothing_outside_its_build(tmp_path, secret_file):
    """The boundary itself, whatever text steers the tools: a step run as the compiler,
    assembler or linker are (here a shell standing in for a tool the text took over)
    cannot read a user's file, write one, or create one outside its build directory."""
    from hlh_mlx.emulator import toolchain
    path, secret = secret_file
    build = tmp_path / "build"
    build.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("unchanged")
    script = (f"cat {path}; echo pwned > {victim}; touch {tmp_path / 'marker'}; "
              f"echo ok > {build / 'inside.txt'}; cat {build / 'inside.txt'}")
    proc = toolchain.run_bounded(["/bin/sh", "-c", script], "confined", build, "a stand-in step")
    assert secret not in proc.stdout + proc.stderr
    assert victim.read_text() == "unchanged" and not (tmp_path / "marker").exists()
    assert (build / "inside.txt").read_text() == "ok\n" and "ok" in proc.stdout  # its own directory works


def test_objects_lose_link_steering_sections_before_the_link(monkeypatch):
    """An object with GCC's LTO sections makes the linker plugin run the compiler again with
    options recorded in the object (a red team wrote any file that way): the sections are
    stripped with the initialisers and the link runs without LTO or the plugin."""
    from hlh_mlx.emulator import toolchain
    seen = []
    real = toolchain.run_bounded
    monkeypatch.setattr(toolchain, "run_bounded", lambda cmd, *a, **k: seen.append(cmd) or real(cmd, *a, **k))
    tag = secrets.token_hex(6)
    body = f"int unique_{tag} = 7; out[0] = inp[0] + unique_{tag};"  # a kernel no cache holds: built here
    _run_u8(emulator.metal_kernel("lto_flags", ["inp"], ["out"], body))
    strip = next(c for c in seen if any(a.startswith("--remove-section=") for a in c))
    assert "--remove-section=.gnu.lto_*" in strip
    link = next(c for c in seen if "-shared" in c)
    assert "-fno-lto" in link and ("-fno-use-linker-plugin" in link or toolchain.find_compiler().is_clang)


def test_without_landlock_no_kernel_is_compiled_unless_the_user_says_so(monkeypatch):
    from hlh_mlx.emulator import confine
    monkeypatch.setattr(confine, "abi", lambda: 0)
    monkeypatch.delenv("HLH_MLX_EMU_UNCONFINED_TOOLCHAIN", raising=False)
    tag = secrets.token_hex(6)
    body = f"int unique_{tag} = 7; out[0] = inp[0] + unique_{tag};"  # not in any cache: compiled here
    with pytest.raises(EmulatorError, match="HLH_MLX_EMU_UNCONFINED_TOOLCHAIN=1"):
        _run_u8(emulator.metal_kernel("no_landlock", ["inp"], ["out"], body))
    monkeypatch.setenv("HLH_MLX_EMU_UNCONFINED_TOOLCHAIN", "1")
    assert _run_u8(emulator.metal_kernel("no_landlock", ["inp"], ["out"], body))[0] == 8


def test_a_compiler_spelling_a_huge_type_is_stopped_before_it_fills_memory(monkeypatch):
    """Types doubling at each typedef make g++ print messages of 2^depth characters (a red
    team's compile step held 4.4 GB in the parent at depth 24): the step's output is read
    through a cap, and the step is stopped past it with a clear error."""
    from hlh_mlx.emulator import launch
    monkeypatch.setattr(launch, "MAX_OUTPUT", 1 << 16)
    header = "template <class A, class B> struct pr {};\ntypedef pr<int, int> T0;\n" + "".join(
        f"typedef pr<T{i}, T{i}> T{i + 1};\n" for i in range(14))
    tag = secrets.token_hex(6)
    with pytest.raises(EmulatorError, match="more than 65536 bytes of messages and was stopped"):
        _run_u8(emulator.metal_kernel(f"huge_{tag}", ["inp"], ["out"], "T14 a = 0; T14 b = 1;", header=header))


def test_a_launcher_without_landlock_is_refused_where_the_system_has_it():
    from hlh_mlx.emulator import confine, launch
    line = 'HLH_LOCKED {"no_new_privs": true, "landlock": %s, "seccomp": true, "probe": true}\n'
    assert launch.lockdown_report(line % "true") is not None
    assert (launch.lockdown_report(line % "false") is None) == (confine.abi() >= 1)


def test_a_compile_step_cannot_read_other_kernels_in_the_cache(tmp_path):
    """A confined step reads the runtime its command names, not the cache's other entries
    (another kernel's generated source or object)."""
    from hlh_mlx.emulator import toolchain
    rt = toolchain.runtime_build("fast")
    other = toolchain.cache_root() / "kernels" / ("other-" + secrets.token_hex(4))
    other.mkdir(parents=True)
    (other / "kernel.cpp").write_text("SECRET_OTHER_KERNEL\n")
    build = tmp_path / "b"
    build.mkdir()
    try:
        proc = toolchain.run_bounded(["/bin/sh", "-c", f"cat {other / 'kernel.cpp'}; cat {rt / 'prelude.h'} | head -c 1",
                                       "-I", str(rt)], "confined", build, "a stand-in step")
    finally:
        import shutil
        shutil.rmtree(other)
    assert "SECRET_OTHER_KERNEL" not in proc.stdout and proc.stdout  # the runtime's prelude was read


def _planting(name, planted):
    """A kernel whose attribute string hands the assembler `planted` (lines, `%` for `@`), its
    body unique so it is built here, not taken from a cache."""
    header = f'__attribute__((symver("plant@V1\\n.local _Z5plantv\\n{planted}"))) int plant() {{ return 1; }}\n'
    body = f"int unique_{secrets.token_hex(6)} = 0; out[0] = plant();"
    return emulator.metal_kernel(name, ["inp"], ["out"], body, header=header)


def test_planted_dynamic_entries_and_relocations_are_refused_before_the_link(monkeypatch, secret_file):
    """With the text checks off, an attribute's string can still plant sections: `.dynamic`
    entries (an init array) and PROGBITS named `.rela.*` that the linker copies into the
    kernel's relocations; a red team ran code while the object loaded that way and read a
    user's file. The object's sections are checked against what a kernel has before the
    link (and the launcher refuses init arrays outright, confines its loading to the
    object with Landlock, and keeps relocations inside the object's data)."""
    from hlh_mlx.emulator import safety
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    path, secret = secret_file
    for planted in (r'.pushsection .dynamic,\"aw\",%progbits\n.quad 25\n.quad 0\n.quad 27\n.quad 0\n.popsection\n',
                    r'.pushsection .rela.data.evil,\"a\",%progbits\n.quad 0\n.quad 17\n.quad 8\n.popsection\n'):
        with pytest.raises(EmulatorError, match="its object holds section") as e:
            _run_u8(_planting("plant", planted))
        assert secret not in str(e.value)


def test_a_kernel_of_a_gigabyte_is_stopped_at_the_build(tmp_path):
    """A static array of a gigabyte made a 1 GB object and a 1 GB library per kernel, and
    the parent read the object whole (a red team filled the cache with a template's
    variants): a build step may write 64 MiB, and the parent reads an object's headers only."""
    tag = secrets.token_hex(6)
    header = f"static volatile char big_{tag}[100000000] = {{1}};\n"
    with pytest.raises(EmulatorError):
        _run_u8(emulator.metal_kernel("big", ["inp"], ["out"], f"out[0] = big_{tag}[7];", header=header))


def test_the_offline_cuda_check_caps_what_nvcc_prints(monkeypatch):
    from hlh_mlx import cuda_source
    from hlh_mlx.emulator import launch
    if cuda_source.nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    monkeypatch.setattr(launch, "MAX_OUTPUT", 1 << 16)
    text = "template <class A, class B> struct pr {};\ntypedef pr<int, int> T0;\n" + "".join(
        f"typedef pr<T{i}, T{i}> T{i + 1};\n" for i in range(14)) + "__global__ void k() { T14 a = 0; T14 b = 1; }\n"
    with pytest.raises(cuda_source.CudaCompileError, match="more than 65536 bytes of messages"):
        cuda_source.compile_check(text)


@pytest.mark.parametrize("mode,refused", [(0o777, True), (0o757, True), (0o775, False), (0o755, False)])
def test_a_cache_others_may_write_to_is_refused(tmp_path, monkeypatch, mode, refused):
    """Its launcher runs unconfined and its objects are trusted as built: a cache folder
    someone else can write to (a shared HLH_MLX_CACHE) could hold a planted launcher. One
    writable by the user's own group (umask 002 with user private groups) is the user's."""
    from hlh_mlx.emulator import toolchain
    shared = tmp_path / f"shared{mode:o}"
    (shared / "emulator").mkdir(parents=True)
    os.chmod(shared / "emulator", mode)
    monkeypatch.setenv("HLH_MLX_CACHE", str(shared))
    if refused:
        with pytest.raises(EmulatorError, match="not this user's alone"):
            toolchain.cache_root()
    else:
        assert toolchain.cache_root() == shared / "emulator"


def test_a_relocation_section_not_tied_to_the_symbol_table_is_refused(monkeypatch):
    """A `.rela.data.*` section with link order (sh_link not the symbol table) is placed by
    its name into the kernel's dynamic relocations: a red team forged a local IFUNC symbol
    with it and ran code while the object loaded. Relocation sections must be what the
    assembler makes: tied to the one symbol table, relocating one real section."""
    from hlh_mlx.emulator import safety
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    planted = (r'.pushsection .data.evil,\"aw\",%progbits\n.quad 0\n.popsection\n'
               r'.pushsection .rela.data.evil,\"o\",%rela,.text\n.quad 0\n.quad 8\n.quad 0\n.popsection\n')
    with pytest.raises(EmulatorError, match="section '.rela.data.evil' of type RELA"):
        _run_u8(_planting("relink", planted))


def _built_object(tmp_path, name):
    """A copy of a freshly built kernel object (a sine and a call into libm: dynamic
    relocations) and its bytes, to edit."""
    import shutil
    from hlh_mlx.emulator import codegen, toolchain
    plist = codegen.params([codegen.InputSig("inp", mx.float32, 1, 4)], "", ["out"], [mx.float32], False)
    tu = codegen.cpp_unit(name, "", f"out[0] = sin(inp[0]) + {secrets.randbelow(999)};", plist, [], False)
    so = tmp_path / "kernel.so"
    shutil.copy(toolchain.build_kernel(name, tu, "", "", "fast"), so)
    return so, bytearray(so.read_bytes())


def _refused_by_the_launcher(name, so, why):
    from hlh_mlx.emulator import launch
    regions = [launch.Region("inp", 16, bytes(16)), launch.Region("out", 16)]
    with pytest.raises(EmulatorError, match=f"kernel object is refused: {why}"):
        launch.run(name, so, regions, (1, 1, 1), (1, 1, 1), sanitize=False, source="", header="")


def _patched_object(tmp_path, change):
    """A built kernel's object with its first dynamic relocation changed by
    `change(r_info, number of dynamic symbols)`."""
    import struct
    so, data = _built_object(tmp_path, "reloc")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    rela = next(struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)
                if struct.unpack_from("<I", data, shoff + i * 64 + 4)[0] == 4)  # the first SHT_RELA
    dynsym = next(struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)
                  if struct.unpack_from("<I", data, shoff + i * 64 + 4)[0] == 11)  # SHT_DYNSYM
    at = rela[4] + 8  # its first entry's r_info
    info, = struct.unpack_from("<Q", data, at)
    struct.pack_into("<Q", data, at, change(info, dynsym[5] // 24))
    so.write_bytes(data)
    return so


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 relocation numbers")
@pytest.mark.parametrize("change,why", [
    (lambda info, n: (info & ~0xFFFFFFFF) | 5, "a relocation of a kind kernels do not have"),  # R_X86_64_COPY
    (lambda info, n: (info & 0xFFFFFFFF) | (n << 32), "bad symbol table"),  # the first past .dynsym, in the file
    (lambda info, n: 17, "a relocation of a kind kernels do not have"),                        # DTPOFF64, symbol 0
])
def test_the_launcher_refuses_relocations_kernels_do_not_have(tmp_path, change, why):
    _refused_by_the_launcher("reloc", _patched_object(tmp_path, change), why)


def test_a_writable_note_section_is_refused(monkeypatch):
    """A writable section named like a note was placed by the linker beside the headers and
    made the loader's tables writable (a red team then rewrote a relocation as it loaded)."""
    from hlh_mlx.emulator import safety
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    planted = r'.pushsection .note.gnu.property.w,\"aw\",%note\n.quad 0\n.popsection\n'
    with pytest.raises(EmulatorError, match="section '.note.gnu.property.w'"):
        _run_u8(_planting("wnote", planted))


@pytest.mark.parametrize("flags,why", [(0x6, "its loader tables lie in a writable segment"),  # the first segment RW
                                       (0x7, "a segment is both writable and executable")])
def test_the_launcher_refuses_loader_tables_a_relocation_could_write(tmp_path, flags, why):
    import struct
    so, data = _built_object(tmp_path, "tables")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phnum, = struct.unpack_from("<H", data, 0x38)
    first_load = next(phoff + i * 56 for i in range(phnum) if struct.unpack_from("<I", data, phoff + i * 56)[0] == 1)
    struct.pack_into("<I", data, first_load + 4, flags)  # p_flags of the segment holding the headers and tables
    so.write_bytes(data)
    _refused_by_the_launcher("tables", so, why)


@pytest.mark.parametrize("macro", ["#define AT __attribute__", "#define CAT(a, b) a##b", "#define S(x) #x",
                                   "#define A [[gnu::used]]", "#define B asm"])
def test_a_macro_cannot_spell_what_the_text_checks_refuse(macro):
    """With the checks on, `#define AT __attribute__` then `AT((SV("...")))` hid an attribute
    string (assembler directives) from the token checks: a macro may not spell attributes,
    `asm`, or build names by pasting or stringising."""
    header = macro + "\nfloat f() { return 1; }\n"
    with pytest.raises(EmulatorError, match="header line 1: a macro may not spell"):
        emulator.metal_kernel("macro", ["inp"], ["out"], "out[0] = f();", header=header)
