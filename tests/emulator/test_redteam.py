"""Red team: kernel text that tries to reach the host, run as an attacker would.

Every case runs twice:
- with the friendly text checks on, where the check names it (or, for what no text check
  looks at, the sandbox stops it), and
- with every text check switched off (safety.FRIENDLY_CHECKS = False: no word filter,
  no link check), where only the containment stands: the launcher's lockdown before
  the kernel object is loaded, and the compiler's own refusals.
Each asserts that nothing happened outside (a canary file unchanged, no marker file,
no connection on a listener on 127.0.0.1, no process left behind) and that the error
is clear.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hlh_mlx import emulator, guard
from hlh_mlx.emulator import (EmulatorError, KernelCompileError, KernelCrashError, KernelTimeoutError,
                              UnsafeKernelError, codegen, launch, safety, toolchain)

LIBC = ('extern "C" { int open(const char*, int, ...); long write(int, const void*, unsigned long); '
        'long read(int, void*, unsigned long); int unlink(const char*); int socket(int, int, int); '
        'int connect(int, const void*, unsigned); int execve(const char*, char* const*, char* const*); '
        'int fork(void); int kill(int, int); long ptrace(long, long, void*, void*); void* malloc(unsigned long); '
        'int mprotect(void*, unsigned long, int); long syscall(long, ...); }\n')

SYSCALL = "the kernel tried to reach outside its sandbox"


@pytest.fixture
def world(tmp_path):
    """What an escape would change: a canary file, a marker path, a TCP listener, a process."""
    canary = tmp_path / "canary.txt"
    secret = secrets.token_hex(16)
    canary.write_text(secret)
    marker = tmp_path / "marker"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    sleeper = subprocess.Popen(["sleep", "600"])  # a process a kernel might try to kill or trace
    w = {"CANARY": str(canary), "MARKER": str(marker), "SLEEPER": sleeper.pid, "PORT": listener.getsockname()[1],
         "PORT_HI": listener.getsockname()[1] >> 8, "PORT_LO": listener.getsockname()[1] & 255}
    yield w
    # nothing happened outside
    assert canary.read_text() == secret, "the canary file was changed"
    assert not marker.exists(), "the marker file was created"
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert sleeper.poll() is None, "the other process was killed"
    sleeper.kill()
    sleeper.wait()
    assert not _kernel_processes(), "a kernel process outlived its call"


def _kernel_processes(parent: int | None = None) -> list[int]:
    """Pids of emulator launchers still running whose parent is `parent` (default: us)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv0 = (d / "cmdline").read_bytes().split(b"\0")[0]
            status = dict(ln.split(":", 1) for ln in (d / "status").read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        if argv0.endswith(b"/launcher") and int(status["PPid"]) == parent and "Z" not in status["State"]:
            pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state


def call(k, n=4):
    return k(inputs=[mx.ones((n,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(n,)],
             output_dtypes=[mx.float32])[0]


# name, header, source, what the friendly checks say (None: they do not look), what containment does
CASES = [
    ("file-write", LIBC, 'int fd = open("{CANARY}", 01 | 01000); write(fd, "pwned", 5); out[0] = fd;',
     "'extern'", (KernelCrashError, SYSCALL)),
    ("file-create", LIBC, 'int fd = open("{MARKER}", 0101, 0644); out[0] = fd;', "'extern'",
     (KernelCrashError, SYSCALL)),
    ("file-read", LIBC, 'char b[64]; int fd = open("/etc/passwd", 0); long n = read(fd, b, 64); out[0] = n;',
     "'extern'", (KernelCrashError, SYSCALL)),
    ("unlink", LIBC, 'out[0] = unlink("{CANARY}");', "'extern'", (KernelCrashError, SYSCALL)),
    ("network", LIBC, 'unsigned char a[16] = {2, 0, {PORT_HI}, {PORT_LO}, 127, 0, 0, 1}; '
     'int s = socket(2, 1, 0); out[0] = connect(s, a, 16);', "'extern'", (KernelCrashError, SYSCALL)),
    ("exec", LIBC, 'const char* argv[] = {"/bin/sh", "-c", "touch {MARKER}", 0}; '
     'out[0] = execve("/bin/sh", (char* const*)argv, 0);', "'extern'", (KernelCrashError, SYSCALL)),
    ("fork-bomb", LIBC, 'for (int k = 0; k < 100000; k++) fork(); out[0] = 1;', "'extern'",
     (KernelCrashError, SYSCALL)),
    ("kill-parent", LIBC, 'out[0] = kill({SLEEPER}, 9);', "'extern'", (KernelCrashError, SYSCALL)),
    ("ptrace", LIBC, 'out[0] = ptrace(16, {SLEEPER}, 0, 0);', "'extern'", (KernelCrashError, SYSCALL)),
    ("executable-memory", LIBC, 'char* p = (char*)malloc(8192); '
     'out[0] = mprotect((void*)(((unsigned long)p + 4095) & ~4095ul), 4096, 7);', "'extern'",
     (KernelCrashError, SYSCALL)),
    ("output-flood", LIBC, 'char b[65536]; for (int k = 0; k < 65536; k++) b[k] = 65; '
     'for (;;) write(1, b, 65536);', "'extern'", (KernelCrashError, "wrote more than 1048576 bytes")),
    ("huge-allocation", LIBC, 'volatile char* p = (volatile char*)malloc(1ul << 36); '
     'for (unsigned long k = 0; k < (1ul << 36); k += 4096) p[k] = 1; out[0] = p[4096];', "'extern'", (KernelCrashError, "crashed with SIGSEGV|killed by")),
    # code at global scope: the body closes the kernel function and declares its own
    ("global-scope-initialiser", LIBC, 'out[0] = 1; }\nint evil = unlink("{CANARY}");\nstatic void pad() {',
     "'extern'", "runs"),
    ("constructor-attribute", LIBC, 'out[0] = 1; }\n__attribute__((constructor)) static void evil() '
     '{ unlink("{CANARY}"); }\nstatic void pad() {', "'extern'", "runs"),
    ("constructor-gnu-attribute", "", 'out[0] = 1; }\n[[gnu::constructor]] static void evil() '
     '{ volatile int* p = 0; *p = 1; }\nstatic void pad() {', "compiler attribute 'gnu::'", "runs"),
    ("constructor-using-attribute", "", 'out[0] = 1; }\n[[using gnu: constructor]] static void evil() '
     '{ volatile int* p = 0; *p = 1; }\nstatic void pad() {', r"\[\[using", "runs"),
    ("static-object", LIBC, 'out[0] = 1; }\nstruct Evil { Evil() { unlink("{CANARY}"); } };\n'
     'static Evil evil;\nstatic void pad() {', "'extern'", "runs"),
    ("builtin-trap", "", '__builtin_trap(); out[0] = 1;', None, (KernelCrashError, "SIGILL")),
    ("stack-overflow", "", 'volatile float big[1 << 22]; big[thread_position_in_grid.x * 1000] = 1; '
     'out[0] = big[7];', None, (KernelCrashError, "crashed|killed by SIG")),
    # the compiler itself refuses these, however they are spelled
    ("asm", "", 'asm volatile("syscall" : : "a"(60), "D"(0)); out[0] = 1;', "inline assembly",
     (KernelCompileError, 'poisoned "asm"')),
    ("__asm__", "", '__asm__ volatile("syscall" : : "a"(60), "D"(0)); out[0] = 1;', "inline assembly",
     (KernelCompileError, 'poisoned "__asm__"')),
    ("line-splice-asm", "", 'as\\\nm volatile(".incbin \\"/etc/passwd\\""); out[0] = 1;', "inline assembly",
     (KernelCompileError, 'poisoned "asm"')),
    ("digraph-paste-asm", "%:define CAT(a, b) a %:%: b\n", 'CAT(as, m)(".incbin \\"/etc/passwd\\""); out[0] = 1;',
     None, (KernelCompileError, 'poisoned "asm"')),
    # _Pragma expands to nothing: a pragma that would stop the compile never runs
    ("pragma-operator", "", '_Pragma("GCC error \\"the pragma ran\\"") out[0] = 1;', None, "runs"),
    ("pragma-operator-pasted", "#define CAT(a, b) a ## b\n", 'CAT(_Pra, gma)("GCC error \\"the pragma ran\\"") '
     'out[0] = 1;', None, "runs"),
    ("pragma-operator-undefined", "#undef _Pragma\n", '_Pragma("GCC error \\"the pragma ran\\"") out[0] = 1;',
     None, (KernelCompileError, "_Pragma. was not declared")),
    ("has-include", "", '#if __has_include("/etc/passwd")\nout[0] = 1;\n#endif\nout[1] = 2;', None,
     (KernelCompileError, 'poisoned "__has_include"')),
]
if platform.machine() == "x86_64":  # unlink by its x86-64 system-call number, no libc
    CASES.append(("raw-syscall", LIBC, 'out[0] = syscall(87, "{CANARY}");', "'extern'", (KernelCrashError, SYSCALL)))


# refused before anything is compiled, whether or not the friendly checks are on
PREPARE_REFUSALS = [
    ("include-system-header", "", "#include <stdlib.h>\nout[0] = 1;", "'#include <stdlib.h>' is not allowed"),
    ("include-passwd", "", '#include "/etc/passwd"\nout[0] = 1;', "'#include \"/etc/passwd\"' is not allowed"),
    ("include-passwd-header", '#include "/etc/passwd"\n', "out[0] = 1;", "header line 1: '#include"),
    ("include-spliced", "", '#inc\\\nlude "/etc/passwd"\nout[0] = 1;', "'#include"),
    ("include-digraph", "", '%:include "/etc/passwd"\nout[0] = 1;', "'#include"),
    ("include-after-comment", "", '/* x */ # /* y */ include "/etc/passwd"\nout[0] = 1;', "'#include"),
    ("include-next", "", '#include_next <stdio.h>\nout[0] = 1;', "'#include_next"),
    ("line-directive", "", '#line 1 "/etc/passwd"\nout[0] = undefined_name;', "directive '#line'"),
    ("pragma-dependency", "", '#pragma GCC dependency "/etc/passwd"\nout[0] = 1;', "'#pragma GCC dependency"),
    ("trigraph", "", '??=include "/etc/passwd"\nout[0] = 1;', "trigraph '??='"),
    ("raw-string", "", 'const char* s = R"x(\n#include "/etc/passwd"\n)x"; out[0] = s[0];', "raw string"),
    # the compiler ends a line at a lone CR, and ignores NUL
    ("include-after-lone-cr", "", 'out[0] = 1;\r#include "/etc/passwd"\n', "line 2: '#include"),
    ("include-spelled-with-ucn", "", '#\\u0069nclude "/etc/passwd"\nout[0] = 1;', "malformed directive"),
    ("include-with-nul", "", '#\x00include "/etc/passwd"\nout[0] = 1;', "control character '\\x00'"),
]


def _fill(text: str, world) -> str:
    for key, value in world.items():
        text = text.replace("{" + key + "}", str(value))
    return text


NAMED = [c for c in CASES if c[3] is not None]  # the others no text check looks at


@pytest.mark.parametrize("name,header,source,friendly,contained", NAMED, ids=[c[0] for c in NAMED])
def test_escape_is_named_by_the_friendly_checks(name, header, source, friendly, contained, world):
    header, source = _fill(header, world), _fill(source, world)
    with pytest.raises(UnsafeKernelError, match=friendly) as e:
        emulator.metal_kernel(name, ["inp"], ["out"], source, header=header)
    assert re.search(r"(source|header) line \d+", str(e.value))


@pytest.mark.parametrize("name,header,source,friendly,contained", CASES, ids=[c[0] for c in CASES])
def test_escape_is_contained_with_every_text_check_off(name, header, source, friendly, contained, world,
                                                         monkeypatch):
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    monkeypatch.setenv("HLH_MLX_EMU_MEMORY", str(4 << 30))
    header, source = _fill(header, world), _fill(source, world)
    k = emulator.metal_kernel(name, ["inp"], ["out"], source, header=header)
    if contained == "runs":
        # the initialiser never ran (Metal has no dynamic initialisation): the kernel did its work
        assert np.asarray(call(k))[0] == 1.0
        return
    cls, pattern = contained
    with pytest.raises(cls, match=pattern) as e:
        call(k)
    assert "root:" not in str(e.value) and "root:" not in getattr(e.value, "log", "")


@pytest.mark.parametrize("name,header,source,named", PREPARE_REFUSALS, ids=[c[0] for c in PREPARE_REFUSALS])
@pytest.mark.parametrize("friendly", [True, False], ids=["friendly", "no-text-checks"])
def test_compiler_never_sees_a_file_named_by_kernel_text(name, header, source, named, friendly, world, monkeypatch):
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", friendly)
    with pytest.raises(UnsafeKernelError, match=re.escape(named)) as e:
        emulator.metal_kernel(name, ["inp"], ["out"], source, header=header)
    assert re.search(r"(source|header) line \d+", str(e.value))
    assert "root:" not in str(e.value)


def test_object_with_initialisers_is_refused_by_the_launcher(world, monkeypatch):
    """Behind the build's stripping of initialisers: the launcher reads the object's
    dynamic section and will not load one that would run code while loading."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    plist = codegen.params([codegen.InputSig("inp", mx.float32, 1, 4)], "", ["out"], [mx.float32], False)
    header = LIBC + _fill('__attribute__((constructor)) static void evil() { unlink("{CANARY}"); }', world)
    tu = codegen.cpp_unit("ctor", header, "out[0] = 1;", plist, [], False)
    so = toolchain.build_kernel("ctor", tu, "", "", "fast", raw_object=True)
    regions = [launch.Region("inp", 16, bytes(16)), launch.Region("out", 16)]
    with pytest.raises(EmulatorError, match="kernel object is refused: it has initialisers"):
        launch.run("ctor", so, regions, (1, 1, 1), (1, 1, 1), sanitize=False, source="", header="")


IFUNC_HEADER = ('static int impl() {{ return unlink("{CANARY}"); }}\n'
                'extern "C" void* pick() {{ return (void*)impl; }}\n'
                'extern "C" int chosen() __attribute__((ifunc("pick")));\n')


def test_object_with_ifunc_resolvers_is_refused_by_the_launcher(world, monkeypatch):
    """An IFUNC resolver would run while the object is relocated: the loader refuses it
    (behind the build's own refusal of IFUNC symbols, skipped here)."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    plist = codegen.params([codegen.InputSig("inp", mx.float32, 1, 4)], "", ["out"], [mx.float32], False)
    tu = codegen.cpp_unit("ifunc", LIBC + _fill(IFUNC_HEADER, world), "out[0] = chosen();", plist, [], False)
    so = toolchain.build_kernel("ifunc", tu, "", "", "fast", raw_object=True)
    regions = [launch.Region("inp", 16, bytes(16)), launch.Region("out", 16)]
    with pytest.raises(EmulatorError, match="kernel object is refused: it has IFUNC resolvers"):
        launch.run("ifunc", so, regions, (1, 1, 1), (1, 1, 1), sanitize=False, source="", header="")


def test_an_ifunc_symbol_is_refused_at_build(world, monkeypatch):
    """An IFUNC symbol nothing relocates against runs its resolver when it is looked up
    (a red team made `msl_kernel_thread` one: its resolver ran before the second filter):
    the build refuses any, and the launcher looks its symbols up under the second filter."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    k = emulator.metal_kernel("ifunc2", ["inp"], ["out"], "out[0] = 1;", header=LIBC + _fill(IFUNC_HEADER, world))
    with pytest.raises(EmulatorError, match="an IFUNC symbol"):
        call(k)


def test_a_launcher_that_cannot_lock_down_loads_nothing(world, monkeypatch):
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    k = emulator.metal_kernel("nolock", ["inp"], ["out"], _fill('unlink("{CANARY}"); out[0] = 1;', world),
                              header=LIBC)
    real = launch.run
    monkeypatch.setattr(launch, "run", lambda *a, **kw: real(*a, **kw, extra_spec=("fail_lockdown",)))
    with pytest.raises(EmulatorError, match="could not lock itself down.*not loaded"):
        call(k)


def test_results_without_the_sandbox_report_are_refused(tmp_path, monkeypatch):
    """A kernel process that does not say it locked itself down is not trusted."""
    fake = tmp_path / "launcher"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'HLH_DONE {}'\n")
    fake.chmod(0o755)
    k = emulator.metal_kernel("unreported", ["inp"], ["out"], "out[0] = 1;")
    real = launch.run
    monkeypatch.setattr(launch, "run", lambda *a, **kw: real(*a, **kw, launcher=fake))
    with pytest.raises(EmulatorError, match="did not report itself sandboxed"):
        call(k)


def test_the_lockdown_report_says_what_held(monkeypatch):
    report = None
    real = launch._check

    def spy(kernel, exe, proc, source, header):
        nonlocal report
        report = launch.lockdown_report(proc.stdout)
        return real(kernel, exe, proc, source, header)

    monkeypatch.setattr(launch, "_check", spy)
    call(emulator.metal_kernel("report", ["inp"], ["out"], "out[0] = 1;"))
    assert report and report["seccomp"] and report["no_new_privs"] and report["probe"]


def test_a_hung_kernel_is_killed_with_its_process_group(world, monkeypatch):
    monkeypatch.setenv("HLH_MLX_EMU_TIMEOUT", "2")
    k = emulator.metal_kernel("spin", ["inp"], ["out"], "volatile int x = 1; while (x) {} out[0] = 1;")
    t = time.monotonic()
    with pytest.raises(KernelTimeoutError, match="did not finish within 2 s"):
        call(k)
    assert time.monotonic() - t < 10
    # the world fixture asserts no launcher is left running


def test_a_hung_kernel_dies_with_the_process_that_ran_it(world, tmp_path):
    """The sweep kills its worker on a timeout: the kernel process must not outlive it."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        import mlx.core as mx
        from hlh_mlx import emulator, guard
        k = emulator.metal_kernel("spin_orphan", ["inp"], ["out"], "volatile int x = 1; while (x) {{}} out[0] = 1;")
        print("start", flush=True)
        k(inputs=[mx.ones((4,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(4,)],
          output_dtypes=[mx.float32])
    """)
    env = dict(os.environ, HLH_MLX_EMU_TIMEOUT="300")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert worker.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        while not _kernel_processes(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        spinning = _kernel_processes(worker.pid)
        assert spinning, "the kernel process never started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in spinning) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in spinning), "the kernel process outlived the worker"


def test_guard_reports_a_hostile_template_and_nothing_happens(world, tmp_path, monkeypatch):
    """guard on an untrusted template: with every text check off, the kernel still runs
    only in the sandbox, which stops it, and guard reports the failure."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    d = tmp_path / "gelu"
    d.mkdir()
    path = d / "hostile.metal.j2"
    path.write_text(_fill('''{#
[meta]
op = "gelu"
inputs = ["x"]
outputs = ["y"]
[params]
TG = [64]
[launch]
grid = ["ceil_div(N, TG) * TG", "1", "1"]
threadgroup = ["TG", "1", "1"]
[template_args]
T = "dtype"
#}
{% set header %}
extern "C" int unlink(const char*);
{% endset %}
uint i = thread_position_in_grid.x;
if (i < x_shape[0]) y[i] = T(float(x[i]) + 0.0f * unlink("{CANARY}"));
''', world))
    findings = guard.scan([path])
    assert findings and all(f.blocking for f in findings)
    assert any(SYSCALL in f.message for f in findings), [str(f) for f in findings]


FORBIDDEN_SYSCALLS = ["openat", "open", "creat", "unlink", "unlinkat", "rename", "mkdir", "truncate", "ftruncate",
                      "socket", "connect", "bind", "sendto", "execve", "execveat", "fork", "vfork", "kill", "tkill",
                      "ptrace", "process_vm_writev", "mount", "umount2", "unshare", "setns", "chroot", "setuid",
                      "prctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "memfd_create", "keyctl",
                      "init_module", "finit_module", "reboot", "pidfd_open", "pidfd_send_signal", "ioctl", "dup",
                      "pipe2", "personality", "chdir", "getppid"]


def _syscall_numbers(tmp_path) -> dict[str, int]:
    """This machine's numbers for the calls above (from its own <sys/syscall.h>)."""
    src = tmp_path / "nr.c"
    src.write_text("#include <stdio.h>\n#include <sys/syscall.h>\nint main(void) {\n" + "".join(
        f'#ifdef SYS_{n}\nprintf("{n} %ld\\n", (long)SYS_{n});\n#endif\n' for n in FORBIDDEN_SYSCALLS) + "}\n")
    exe = tmp_path / "nr"
    subprocess.run(["gcc", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: int(nr) for name, nr in (ln.split() for ln in out.splitlines())}


def test_the_allow_list_kills_every_other_system_call(world, tmp_path, monkeypatch):
    """One kernel, one raw system call per run, numbered at run time: each kills the
    process (getppid, the lockdown probe, answers an error instead)."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    numbers = _syscall_numbers(tmp_path)
    assert {"openat", "socket", "execve", "kill", "io_uring_setup"} <= set(numbers)
    k = emulator.metal_kernel("raw", ["nr"], ["out"], "out[0] = (float)syscall((long)nr[0], 0, 0, 0, 0, 0);",
                              header='extern "C" long syscall(long, ...);\n')
    for name, nr in numbers.items():
        run = lambda: k(inputs=[mx.array([nr], dtype=mx.int32)], grid=(1, 1, 1), threadgroup=(1, 1, 1),  # noqa: E731
                        output_shapes=[(1,)], output_dtypes=[mx.float32])[0]
        if name == "getppid":
            assert np.asarray(run()).tolist() == [-1.0]
            continue
        with pytest.raises(KernelCrashError, match="SIGSYS") as e:
            run()
        assert SYSCALL in str(e.value), name


def test_the_launcher_looks_up_the_kernels_symbols_under_the_second_filter(world, monkeypatch):
    """Were an IFUNC entry symbol past the build's refusal (raw_object), its resolver runs
    when the launcher looks the symbol up: that is after the second filter, where an open
    kills the process like any kernel code's (before, it ran under the loading filter and
    could open and read files)."""
    monkeypatch.setattr(safety, "FRIENDLY_CHECKS", False)
    header = LIBC + ('extern "C" void real_entry(void* const* p, const msl_thread_info*) { ((float*)p[1])[0] = 1; }\n'
                     'extern "C" void* evil_resolver() { syscall(257, -100, "/etc/ld.so.cache", 02000000); '
                     'return (void*)&real_entry; }\n'
                     'extern "C" void msl_kernel_thread(void* const*, const msl_thread_info*) '
                     '__attribute__((ifunc("evil_resolver")));\n#define msl_kernel_thread msl_kernel_thread_renamed\n')
    plist = codegen.params([codegen.InputSig("inp", mx.float32, 1, 4)], "", ["out"], [mx.float32], False)
    tu = codegen.cpp_unit("ifunc_entry", header, "out[0] = 1;", plist, [], False)
    so = toolchain.build_kernel("ifunc_entry", tu, "", "", "fast", raw_object=True)
    regions = [launch.Region("inp", 16, bytes(16)), launch.Region("out", 16)]
    with pytest.raises(EmulatorError, match=SYSCALL):
        launch.run("ifunc_entry", so, regions, (1, 1, 1), (1, 1, 1), sanitize=False, source="", header="")
