"""Compile emulated kernels: find a C++ compiler, build the launcher once, cache kernel objects.

Kernel text reaches the compiler only through safety.prepare (every directive decided)
and behind codegen.POISON; diagnostics never quote a file, and messages located in any
file but ours are withheld. Each kernel becomes a shared object without initialisers.
Every step that reads kernel text or what it made (compile, objcopy, nm, link) runs
confined (confine.py): it can read the system's tools and the runtime, and write only
its own build directory, whatever the text makes it do.

Everything built lands in a cache directory keyed by what could change the binary
(compiler identity, flags, runtime sources, the kernel's generated C++), so a second
run of a process compiles nothing. Builds go to a temporary directory and are renamed
into place, so concurrent processes never see half a build.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import confine
from .errors import EmulatorError, KernelCompileError, KernelTimeoutError, UnsafeKernelError

RUNTIME_DIR = Path(__file__).parent / "runtime"
RUNTIME_FILES = ("msl_types.h", "msl_math.h", "msl_sync.h", "msl_rt_api.h", "mlx_utils.h", "runtime.cpp")

# What a kernel object may call: the runtime, ThreadSanitizer's hooks (sanitizer builds),
# libm, and the few symbols compilers emit on their own. Anything else (system, fopen,
# a function the kernel declared itself) is refused before the kernel runs.
_ALLOWED_SYMBOL = re.compile(
    r"^(msl_rt_\w+|__tsan_\w+|_GLOBAL_OFFSET_TABLE_|__stack_chk_fail|__dso_handle|__cxa_atexit"
    r"|__cxa_guard_(acquire|release|abort)|__tls_get_addr|memcpy|memmove|memset"
    r"|__(extend|trunc)[a-z]{4}2|__(u?div|u?mod|mul)ti3|__popcount[a-z]i2|__(mul|div)[sd]c3"  # libgcc arithmetic
    r"|(acos|acosh|asin|asinh|atan|atan2|atanh|cbrt|ceil|copysign|cos|cosh|erf|erfc|exp|exp2|expm1|fabs"
    r"|fdim|floor|fma|fmax|fmin|fmod|frexp|hypot|ldexp|lgamma|log|log10|log1p|log2|modf|nextafter|pow"
    r"|remainder|rint|round|sin|sinh|sqrt|tan|tanh|tgamma|trunc|sincos)f?)$"
)

COMMON_FLAGS = (
    # -fstack-clash-protection probes every page of a large private array, so one that
    # overflows a thread's stack hits its guard page instead of another thread's stack
    # -fPIC: the kernel is a shared object the launcher loads after locking itself down
    # -fno-lto: an object with LTO sections would have the linker run the compiler again
    "-std=gnu++17", "-fno-lto", "-fstack-clash-protection", "-fwrapv", "-fno-strict-aliasing", "-ffp-contract=off", "-fno-exceptions",
    "-fno-rtti", "-fPIC", "-fno-stack-protector", "-Wno-literal-suffix", "-Wno-unknown-pragmas",
    "-Wno-attributes", "-Wno-ignored-attributes", "-Wno-unused-value",
)
MODE_FLAGS = {
    "fast": ("-O2",),
    # instrumented loads/stores call the runtime's __tsan_* hooks; frame pointers and
    # debug lines map a fault back to the kernel source line
    "sanitize": ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=thread", "-DMSL_SANITIZE"),
}


@dataclass(frozen=True)
class Compiler:
    path: str
    version: str
    is_clang: bool

    @property
    def ident(self) -> str:
        return f"{self.path} {self.version}"

    def mode_flags(self, mode: str) -> tuple[str, ...]:
        flags = MODE_FLAGS[mode]
        if mode == "sanitize" and not self.is_clang:
            flags += ("--param=tsan-instrument-func-entry-exit=0",)
        # a diagnostic never quotes a line of a file: kernel text could point one (#line) at any file
        if self.is_clang:
            flags += ("-Wno-user-defined-literals", "-Wno-unknown-warning-option", "-fno-caret-diagnostics")
        else:
            flags += ("-fno-diagnostics-show-caret", "-fdiagnostics-plain-output")
        return flags


@functools.lru_cache(maxsize=None)
def find_compiler() -> Compiler:
    """The C++ compiler: $HLH_MLX_CXX, else g++, else clang++ (15 or newer: _Float16), else c++.

    g++ comes first because it is the tested path (Debian's g++ 12 here and in CI); the
    shim is portable C++17 and uses no clang-only extension.
    """
    candidates = [os.environ["HLH_MLX_CXX"]] if os.environ.get("HLH_MLX_CXX") else ["g++", "clang++", "c++"]
    for name in candidates:
        path = shutil.which(name)
        if not path:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        first = out.splitlines()[0] if out else "unknown"
        is_clang = "clang" in out.lower()
        version = re.search(r"clang version (\d+)", out)
        if is_clang and version and int(version.group(1)) < 15:
            raise EmulatorError(f"[emulator] {path} is clang {version.group(1)}: it lacks _Float16 (Metal half) on "
                                "this target; use g++ or clang 15 or newer (HLH_MLX_CXX)")
        return Compiler(path, first, is_clang)
    raise EmulatorError(
        "[emulator] no C++ compiler found (tried " + ", ".join(candidates) + "). Install one: "
        "`apt-get install g++` (Debian/Ubuntu) or `pip install ziglang` and set "
        "HLH_MLX_CXX='python -m ziglang c++'."
    )


def cache_root() -> Path:
    """The emulator's cache (created private), refused unless this user owns it and no one
    else may write to it: its launcher runs unconfined and its objects are trusted as built."""
    root = os.environ.get("HLH_MLX_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hlh_mlx"
    return _owned(base / "emulator")


@functools.lru_cache(maxsize=None)
def _owned(root: Path) -> Path:
    for d in (root.parent, root):
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = d.lstat()
        except OSError as e:
            raise EmulatorError(f"[emulator] cannot use the cache folder {d}: {e.strerror} (HLH_MLX_CACHE)") from None
        # group-writable is fine where the group is the user's own (umask 002 with user
        # private groups, Debian's and Ubuntu's default), not where another group may write
        shared = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != os.getgid())
        if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.getuid() or shared:
            raise EmulatorError(
                f"[emulator] the cache folder {d} is not this user's alone (a link, another owner, or writable by "
                "others): someone else could plant the launcher or kernels it runs. Use a folder of your own "
                "(HLH_MLX_CACHE) or `chmod go-w` it")
    return root


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def swizzle_members(n: int) -> str:
    """Union members for every 2-, 3- and 4-component swizzle of an n-vector."""
    members = []
    for letters in ("xyzw", "rgba"):
        for k in (2, 3, 4):
            for idx in itertools.product(range(n), repeat=k):
                name = "".join(letters[i] for i in idx)
                members.append(f"swz<T,{n},{','.join(map(str, idx))}> {name};")
    return " ".join(members)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise EmulatorError(f"[emulator] {what} failed:\n{proc.stderr[-4000:]}")
    return proc


MIN_COMPILE_SECONDS = 10.0  # a compile on a busy machine, whatever the kernel time limit


def compile_timeout() -> float:
    """Seconds one compile step of a kernel may take: the kernel time limit
    (HLH_MLX_EMU_TIMEOUT), never under MIN_COMPILE_SECONDS."""
    from .launch import timeout_seconds
    return max(timeout_seconds(), MIN_COMPILE_SECONDS)


COMPILE_MEMORY = 8 << 30      # address space of each compiler process
COMPILE_FILE_SIZE = 64 << 20  # largest file a compile step may write (a kernel's object is kilobytes)


def _compile_limits(cpu_seconds: int, ruleset: confine.Ruleset) -> None:  # runs in the child, before exec
    for what, value in ((resource.RLIMIT_AS, COMPILE_MEMORY),
                        (resource.RLIMIT_FSIZE, COMPILE_FILE_SIZE), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    ruleset.apply()


def _readable(cmd: list[str]) -> tuple[str, ...]:
    """What a confined step may read besides the system's directories and its own build: the
    tools' own installations, and the runtime the command names (`-I DIR`, `-include FILE`:
    its headers and prelude). Not the rest of the cache: other kernels' sources and objects."""
    named = {str(Path(cmd[i + 1]) if flag == "-I" else Path(cmd[i + 1]).parent)
             for i, flag in enumerate(cmd[:-1]) if flag in ("-I", "-include")}
    tool = shutil.which(cmd[0]) or cmd[0]
    return (*sorted(named), *confine.tool_prefixes(tool, find_compiler().path, objcopy(), _nm()))


def confined_reader(cmd: list[str], readable: Path, what: str) -> str:
    """stdout of a tool reading a kernel's files beneath `readable` (addr2line on an object),
    run as every tool on kernel text runs (run_bounded), in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix=".read-", dir=cache_root()) as tmp:  # made, checked: _owned
        return _checked(run_bounded(cmd, "(reading)", Path(tmp), what, (str(readable),)), what).stdout


def run_bounded(cmd: list[str], kernel: str, cwd: Path, what: str, also_readable: tuple = (),
                timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run one step on kernel text (compiler, objcopy, nm, linker; nvcc for the offline CUDA
    check) confined to its build directory `cwd` (confine.py), with a time limit (default
    compile_timeout()), CPU-time, memory and file-size limits, its output capped, in its own
    process group (killed whole on timeout), stdin empty."""
    confine.required()
    timeout = timeout or compile_timeout()
    cpu = int(timeout) + 5
    from .launch import MAX_OUTPUT, communicate_capped, TooMuchOutput, kill_group
    with confine.Ruleset(cwd, _readable(cmd) + tuple(also_readable)) as ruleset:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(cwd)}, pass_fds=ruleset.pass_fds,
                                preexec_fn=lambda: _compile_limits(cpu, ruleset))
    try:
        out, err = communicate_capped(proc, None, timeout)
    except TooMuchOutput:
        kill_group(proc)
        raise KernelCompileError(kernel, None, None, f"{what}: the tool wrote more than {MAX_OUTPUT} bytes of "
                                 "messages and was stopped (a type or expansion kernel text made huge?)", "",
                                 "") from None
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise KernelTimeoutError(
            f"[emulator] kernel '{kernel}': {what} did not finish within {timeout:g} s and was stopped "
            "(HLH_MLX_EMU_TIMEOUT sets the limit)") from None
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode == 126 and not out and not err:  # the child could not confine itself (confine.apply)
        raise EmulatorError(f"[emulator] kernel '{kernel}': {what} could not be confined (Landlock refused the "
                            "restriction); nothing was run")
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) or proc.returncode == -signal.SIGXFSZ:
        raise KernelTimeoutError(f"[emulator] kernel '{kernel}': {what} ran out of its time, memory or file-size "
                                 "limit and was stopped")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)


def runtime_build(mode: str) -> Path:
    """Build (once per cache) the runtime object and the precompiled prelude for a mode."""
    return _runtime_build(mode, cache_root())


@functools.lru_cache(maxsize=None)
def _runtime_build(mode: str, root: Path) -> Path:
    cxx = find_compiler()
    sources = b"".join((RUNTIME_DIR / f).read_bytes() for f in RUNTIME_FILES)
    key = _sha(cxx.ident, mode, " ".join(COMMON_FLAGS + cxx.mode_flags(mode)), sources)
    final = root / f"runtime-{mode}-{key}"
    if (final / "launcher").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".build-"))
    for f in RUNTIME_FILES:
        shutil.copy(RUNTIME_DIR / f, tmp / f)
    swz = "".join(f"#define MSL_SWIZZLES_{n} {swizzle_members(n)}\n" for n in (2, 3, 4))
    (tmp / "prelude.h").write_text(swz + '#include "mlx_utils.h"\n')
    flags = [*COMMON_FLAGS, *cxx.mode_flags(mode)]
    # the precompiled prelude: the vector types and their swizzles cost most of a compile
    _run([cxx.path, *flags, "-x", "c++-header", "prelude.h", "-o", "prelude.h.gch"], "building the prelude", tmp)
    rt_flags = [f for f in flags if not f.startswith(("-fsanitize", "--param", "-DMSL_SANITIZE"))]
    _run([cxx.path, *rt_flags, "-O2", "-pthread", "-c", "runtime.cpp", "-o", "runtime.o"], "building the runtime", tmp)
    # the launcher: locks itself down, then loads a kernel object; -rdynamic exports the
    # msl_rt_* and __tsan_* functions the kernel object calls
    _run([cxx.path, "-rdynamic", "-pthread", "runtime.o", "-ldl", "-lm", "-o", "launcher"], "linking the launcher", tmp)
    _publish(tmp, final)
    return final


_DIAG = re.compile(r"^(source|header):(\d+):(?:(\d+):)? (error|fatal error): (.*)$")


_LOCATED = re.compile(r"^(?:In file included from )?([^:\s][^:]*):\d+")
_OWN_FILES = {"source", "header", "entry", "kernel.cpp", "<command-line>", "cc1plus"} | set(RUNTIME_FILES) | {"prelude.h"}


def _own_diagnostics(stderr: str) -> str:
    """The compiler's messages about our files and the kernel text only: a message located
    in any other file (kernel text might have pointed the compiler at one) is withheld."""
    out = []
    for line in stderr.splitlines():
        m = _LOCATED.match(line)
        if m and os.path.basename(m.group(1)) not in _OWN_FILES:
            out.append("(a message about another file was withheld)")
        else:
            out.append(line)
    return "\n".join(out)


def _compile_error(name: str, stderr: str, source: str, header: str) -> KernelCompileError:
    from .launch import quote_text

    lines = {"source": source.splitlines(), "header": header.splitlines()}
    stderr = quote_text(_own_diagnostics(stderr))
    for raw in stderr.splitlines():
        m = _DIAG.match(raw)
        if m:
            where, line = m.group(1), int(m.group(2))
            text = quote_text(lines[where][line - 1].strip()) if 0 < line <= len(lines[where]) else ""
            return KernelCompileError(name, where, line, m.group(5), text, stderr)
    return KernelCompileError(name, None, None, "the generated C++ did not compile", "", stderr)


_INIT_SECTIONS = (".init_array*", ".rela.init_array*", ".preinit_array*", ".rela.preinit_array*", ".ctors*",
                  ".rela.ctors*", ".fini_array*", ".rela.fini_array*", ".dtors*", ".rela.dtors*", ".init", ".fini")
# What a kernel object may hold after the initialisers are stripped: code, data, unwind
# tables, debug lines, and relocations of those (SHT_RELA/REL, named for what they relocate).
# Kernel text can plant any other section through an assembler directive (an attribute's
# string, were the text checks bypassed): `.dynamic` entries or `.rela.*` data the linker
# would copy into the kernel's dynamic section and relocations (a red team ran code while
# the object loaded that way). Anything else refuses the kernel before the link.
_SECTION_NAMES = (".text", ".rodata", ".data", ".bss", ".tdata", ".tbss", ".eh_frame", ".comment", ".debug_",
                  ".note.GNU-stack", ".note.gnu.property", ".gcc_except_table", ".group", ".symtab", ".strtab",
                  ".shstrtab", ".llvm_addrsig")
# ... and only with the flags those sections have: a writable note (placed by the linker
# beside the headers) made the loader's tables writable; code only in .text
_NOTES = (".note.GNU-stack", ".note.gnu.property")
_SHF_WRITE, _SHF_EXECINSTR = 0x1, 0x4
_WRITABLE = (".data", ".bss", ".tdata", ".tbss", ".gcc_except_table", ".eh_frame")
_SECTION_TYPES = {0: "NULL", 1: "PROGBITS", 2: "SYMTAB", 3: "STRTAB", 4: "RELA", 7: "NOTE", 8: "NOBITS",
                  9: "REL", 14: "INIT_ARRAY", 15: "FINI_ARRAY", 16: "PREINIT_ARRAY", 17: "GROUP",
                  0x70000001: "X86_64_UNWIND", 0x6FFF4C03: "LLVM_ADDRSIG"}  # (init arrays: named as such only)


def _allowed_section(name: str, kind: str, names: tuple, also: tuple, relocated: str | None) -> bool:
    """`relocated`: for a relocation section, the name of the section it relocates (sh_info,
    flagged SHF_INFO_LINK, not loaded), else None: a `.rela.*` section of loaded bytes, or
    one relocating nothing, is data the linker would copy into the kernel's relocations."""
    if kind in ("INIT_ARRAY", "FINI_ARRAY", "PREINIT_ARRAY"):
        return bool(also) and name.startswith(also)
    if kind in ("RELA", "REL"):
        stem = name[len(".rela"):] if name.startswith(".rela") else name[len(".rel"):] if name.startswith(".rel") else ""
        return relocated is not None and stem == relocated and stem.startswith(names + also)
    return kind == "NULL" or (name.startswith(names) and not name.startswith((".rela", ".rel.")))


def section_problem(obj: Path, also: tuple = ()) -> str | None:
    """None when the relocatable object's sections are all ones a kernel has (and `also`,
    name prefixes), else which is not."""
    names = _SECTION_NAMES + also
    import struct
    st = obj.lstat()  # the step's own file, never a link or a FIFO it made to another
    if not obj.is_file() or obj.is_symlink() or st.st_size > COMPILE_FILE_SIZE:
        return "not a regular object file of a kernel's size"
    with open(obj, "rb") as f:  # only the headers and the section names are read
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return "not a 64-bit little-endian ELF object"
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        if shentsize != 64 or shoff + shnum * 64 > st.st_size or shstrndx >= shnum:
            return "malformed section headers"
        f.seek(shoff)
        table = f.read(shnum * 64)
        headers = [struct.unpack_from("<IIQQQQIIQQ", table, i * 64) for i in range(shnum)]
        names_at, names_size = headers[shstrndx][4], headers[shstrndx][5]
        if names_at + names_size > st.st_size or names_size > 1 << 20:
            return "malformed section names"
        f.seek(names_at)
        names_blob = f.read(names_size)

    def name_of(h) -> str:
        end = names_blob.find(b"\0", h[0])
        return names_blob[h[0]:end].decode("latin-1") if 0 <= h[0] < end else "?"
    shf_info_link, shf_group = 0x40, 0x200
    symtabs = [i for i, h in enumerate(headers) if h[1] == 2]
    targets: set = set()
    for h in headers:
        name, kind, flags, link, info, entsize = name_of(h), _SECTION_TYPES.get(h[1]), h[2], h[6], h[7], h[9]
        relocated = None
        if kind in ("RELA", "REL"):
            # what the assembler makes for relocations, and nothing else: the linker places a
            # relocation section not tied to the symbol table (another sh_link, link order,
            # compression) by its name, `.rela.data.*` into the kernel's dynamic relocations
            # (a red team forged a loader-run IFUNC that way)
            genuine = (len(symtabs) == 1 and link == symtabs[0] and 0 < info < shnum and info not in targets
                       and flags & shf_info_link and not flags & ~(shf_info_link | shf_group)
                       and entsize == (24 if kind == "RELA" else 16) and headers[info][1] not in (4, 9))
            if genuine:
                targets.add(info)
                relocated = name_of(headers[info])
        if kind is None or not _allowed_section(name, kind, names, also, relocated):
            return f"section {name!r} of type {kind or hex(h[1])}"
        if (kind == "NOTE" and name not in _NOTES or flags & _SHF_WRITE and not name.startswith(_WRITABLE + also)
                or flags & _SHF_EXECINSTR and not name.startswith(".text")):
            return f"section {name!r} with flags {flags:#x}"
    return None


# sections a kernel's text could plant to steer the link (LTO's: the linker would run the
# compiler again with options recorded in them), dropped with the initialisers
_STEERING_SECTIONS = (".gnu.lto_*", ".gnu.lto*", ".gnu_object_only", ".llvm.lto*", ".llvmbc", ".llvmcmd")


@functools.lru_cache(maxsize=None)
def objcopy() -> str:
    tool = shutil.which("objcopy") or shutil.which("llvm-objcopy")
    if not tool:
        raise EmulatorError("[emulator] no `objcopy` (install binutils)")
    return tool


def launcher(mode: str) -> Path:
    """The program that locks itself down and then runs a kernel object."""
    return runtime_build(mode) / "launcher"


@functools.lru_cache(maxsize=None)
def _nm() -> str:
    nm = shutil.which("nm") or shutil.which("llvm-nm")
    if not nm:
        raise EmulatorError("[emulator] cannot check what the kernel links against: no `nm` (install binutils)")
    return nm


def ifunc_symbols(obj: Path, kernel: str = "(object)") -> list[str]:
    """The object's own IFUNC symbols (nm type `i`): a resolver runs when the symbol is looked
    up or bound, code of the kernel text's choosing outside the kernel's run."""
    out = _checked(run_bounded([_nm(), "--defined-only", "--format=posix", obj.name], kernel, obj.parent,
                                "listing kernel symbols"), "listing kernel symbols").stdout
    return [line.rsplit(" ", 3)[0] for line in out.splitlines() if len(line.rsplit(" ", 3)) == 4
            and line.rsplit(" ", 3)[1] == "i"]


def undefined_symbols(obj: Path, kernel: str = "(object)") -> list[str]:
    out = _checked(run_bounded([_nm(), "-u", "-C", "--format=posix", obj.name], kernel, obj.parent,
                                "listing kernel symbols"), "listing kernel symbols").stdout
    # posix format "NAME TYPE": demangled C++ names may contain spaces, the type never does
    return [line.rstrip().rsplit(" ", 1)[0] for line in out.splitlines() if line.strip()]


def _checked(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        from .launch import quote_text
        raise EmulatorError(f"[emulator] {what} failed:\n{quote_text(proc.stderr[-4000:])}")
    return proc


def _dependencies(make_rule: str) -> set[str] | None:
    """The files of a `-M` make rule (`kernel.o: a b \\ ...`), or None if there is none."""
    text = make_rule.replace("\\\n", " ")
    head, sep, rest = text.partition(":")
    if not sep or head.strip() != "kernel.o":
        return None
    # a space inside a name is written `\ `
    return {f.replace("\x00", " ") for f in rest.replace("\\ ", "\x00").split()}


def _list_dependencies(kernel: str, cxx: Compiler, flags: list[str], cwd: Path) -> set[str] | None:
    # stderr is dropped: a file's content must not reach any message
    proc = run_bounded([cxx.path, *flags, "-M", "-MG", "-w", "kernel.cpp"], kernel, cwd, "listing the files read")
    return _dependencies(proc.stdout)


@functools.lru_cache(maxsize=None)
def _baseline_dependencies(cxx: Compiler, flags: tuple[str, ...]) -> frozenset[str]:
    """The files the compile of a trivial kernel reads (the prelude, runtime and system headers)."""
    with tempfile.TemporaryDirectory(prefix=".deps-", dir=cache_root()) as tmp:
        (Path(tmp) / "kernel.cpp").write_text("static int msl_trivial_kernel;\n")
        deps = _list_dependencies("(baseline)", cxx, list(flags), Path(tmp))
    if deps is None:
        raise EmulatorError("[emulator] cannot list the files a kernel's compile reads (`-M`)")
    return frozenset(deps)


def _check_dependencies(name: str, cxx: Compiler, flags: list[str], tmp: Path) -> None:
    """Defence in depth behind safety.prepare: the compiler itself lists every file the
    final translation unit would read; one that a trivial kernel does not read (an
    #include that slipped past the lexer) refuses the kernel before it is compiled."""
    baseline = _baseline_dependencies(cxx, tuple(flags))
    deps = _list_dependencies(name, cxx, flags, tmp)
    if deps is None:
        raise UnsafeKernelError(f"[emulator] kernel '{name}': the compiler could not list the files its compile "
                                "reads; the kernel is refused")
    extra = sorted(deps - baseline)
    if extra:
        from .launch import quote_text
        raise UnsafeKernelError(
            f"[emulator] kernel '{name}' would make the compiler read "
            + ", ".join(quote_text(f) for f in extra[:5])
            + ": kernel text may include only Metal's standard headers; the kernel is refused")


def build_kernel(name: str, tu: str, source: str, header: str, mode: str, *, check_symbols: bool = True,
                 raw_object: bool = False) -> Path:
    """Compile a generated translation unit into a kernel shared object (cached).

    The symbol check is a friendly error (safety.FRIENDLY_CHECKS switches it off with the
    others); `raw_object=True` exists only so tests can reach the launcher's own refusals:
    the object keeps its initialisers and IFUNC symbols (planted sections are still refused).
    """
    from . import safety

    check_symbols = check_symbols and safety.FRIENDLY_CHECKS
    cxx = find_compiler()
    rt = runtime_build(mode)
    key = _sha(rt.name, tu, str(check_symbols), str(raw_object))
    final = cache_root() / "kernels" / key
    exe = final / "kernel.so"
    if exe.exists():
        return exe
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".build-"))
    try:
        (tmp / "kernel.cpp").write_text(tu)
        flags = [*COMMON_FLAGS, *cxx.mode_flags(mode), "-I", str(rt), "-include", str(rt / "prelude.h")]
        _check_dependencies(name, cxx, flags, tmp)
        proc = run_bounded([cxx.path, *flags, "-c", "kernel.cpp", "-o", "kernel.o"], name, tmp, "compiling")
        if proc.returncode != 0:
            raise _compile_error(name, proc.stderr, source, header)
        foreign = [s for s in undefined_symbols(tmp / "kernel.o", name) if check_symbols and not _ALLOWED_SYMBOL.match(s)]
        if foreign:
            raise UnsafeKernelError(
                f"[emulator] kernel '{name}' calls functions outside the Metal/MLX surface: "
                + ", ".join(sorted(set(foreign)))
            )
        # Metal has no dynamic initialisation of program-scope variables: drop every
        # initialiser and finaliser section (the launcher refuses an object with any left)
        strip = (*(() if raw_object else _INIT_SECTIONS), *_STEERING_SECTIONS)
        _checked(run_bounded([objcopy(), *[f"--remove-section={p}" for p in strip], "kernel.o"], name,
                              tmp, "stripping initialisers"), "stripping initialisers")
        # (initialisers kept only where a test reaches the launcher's own refusal of them)
        kept = tuple(p.rstrip("*") for p in _INIT_SECTIONS if not p.startswith(".rela")) if raw_object else ()
        planted = section_problem(tmp / "kernel.o", kept)
        if not planted and not raw_object and ifunc_symbols(tmp / "kernel.o", name):
            planted = "an IFUNC symbol (a resolver that runs when it is looked up)"
        if planted:
            from .launch import quote_text
            raise UnsafeKernelError(f"[emulator] kernel '{name}': its object holds {quote_text(planted)}, which no "
                                    "kernel has (kernel text planted it?); the kernel is refused")
        no_plugin = () if cxx.is_clang else ("-fno-use-linker-plugin",)
        _checked(run_bounded([cxx.path, "-shared", "-nostartfiles", "-fno-lto", *no_plugin, "-Wl,-z,now",
                               "-Wl,-z,noexecstack", "kernel.o", "-lm", "-o", "kernel.so"], name, tmp,
                              "linking the kernel"), "linking the kernel")
        so = tmp / "kernel.so"
        if so.is_symlink() or not so.is_file():
            raise UnsafeKernelError(f"[emulator] kernel '{name}': the link did not make a regular file; refused")
        os.chmod(so, 0o644)
        (tmp / "kernel.o").unlink()  # never used again
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return exe
