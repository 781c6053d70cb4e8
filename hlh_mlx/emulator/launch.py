"""Run one dispatch of a compiled kernel in a locked-down child process; read its outputs back.

All buffers of the dispatch live in one file (in /dev/shm when there is one), laid out
in parameter order. The child is the launcher (runtime.cpp): it maps the file, locks
itself down, reports that on stdout, and only then loads the kernel object and runs it.
No result is used without that report. The child runs in its own session (a timeout
kills its whole group) and dies with this process. With the sanitizer each buffer is
page-aligned and the launcher maps it far from the others, so an access that strays off
one buffer lands in no buffer and is reported against it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EmulatorError, KernelCrashError, KernelTimeoutError, SanitizerError


@dataclass
class Region:
    """Bytes of one parameter: `data` goes in at `pointer` bytes into the region."""
    name: str
    nbytes: int
    data: bytes | np.ndarray | None = None   # None: an output, filled with `fill`
    fill: bytes = b"\xff"
    pointer: int = 0
    offset: int = 0


def _tmpdir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


# Where a buffer starts without the sanitizer: Metal buffers are at least this aligned, and
# a kernel's vec<T, 4> loads compile to aligned vector instructions (a buffer that followed
# an odd-sized one crashed them with SIGSEGV, where the sanitizer's page-aligned layout passed).
ALIGN = 64


def _layout(regions: list[Region], sanitize: bool) -> int:
    pos = 0
    for r in regions:
        if sanitize:  # page-aligned: the launcher maps each buffer on its own, far from the others
            pos = (pos + 4095) // 4096 * 4096
        else:
            pos = (pos + ALIGN - 1) // ALIGN * ALIGN
        r.offset = pos
        pos += max(r.nbytes, 1)
    return (pos + 4095) // 4096 * 4096 + 4096 if sanitize else pos + 64


def timeout_seconds() -> float:
    return float(os.environ.get("HLH_MLX_EMU_TIMEOUT", "120"))


def workers() -> int:
    return int(os.environ.get("HLH_MLX_EMU_THREADS", str(os.cpu_count() or 1)))


def cpu_seconds() -> int:
    """CPU-time limit of a kernel process: the wall-clock limit on every worker, and some."""
    return int(timeout_seconds() * max(1, workers())) + 5


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process and everything in its process group, reap it, close its pipes (the
    kernel process here; a toolchain step in toolchain.run_bounded)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


def run(kernel: str, exe: Path, regions: list[Region], grid, threadgroup, *, sanitize: bool,
        source: str, header: str, reverse: bool = False, launcher: Path | None = None,
        extra_spec: tuple[str, ...] = ()) -> list[bytes]:
    """Run the kernel object `exe` under the launcher; return the final bytes of every region.

    The launcher locks its process down (see runtime.cpp) before it loads the object and
    says so on stdout; without that report no result is used.
    """
    from . import toolchain

    launcher = launcher or toolchain.launcher("sanitize" if sanitize else "fast")
    size = _layout(regions, sanitize)
    fd, path = tempfile.mkstemp(prefix="hlh-emu-", dir=_tmpdir())
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            for r in regions:
                if r.data is None:
                    mm[r.offset:r.offset + r.nbytes] = (r.fill * (r.nbytes // len(r.fill) + 1))[:r.nbytes]
                elif r.nbytes:
                    mm[r.offset:r.offset + r.nbytes] = bytes(r.data) if not isinstance(r.data, bytes) else r.data
        spec = [f"file {path}", "grid %d %d %d" % tuple(grid), "threadgroup %d %d %d" % tuple(threadgroup),
                f"workers {workers()}", f"order {'reverse' if reverse else 'forward'}",
                f"sanitize {int(sanitize)}", f"memlimit {int(os.environ.get('HLH_MLX_EMU_MEMORY', 16 << 30))}",
                f"cpulimit {cpu_seconds()}", *extra_spec]
        spec += [f"param {r.offset} {r.nbytes} {r.pointer} {r.name}" for r in regions]
        # its own session: a timeout kills the whole group; the launcher also dies with us
        proc = subprocess.Popen([str(launcher), str(exe), str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env={})
        try:
            out, err = communicate_capped(proc, ("\n".join(spec) + "\n").encode(), timeout_seconds())
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise KernelTimeoutError(
                f"[emulator] kernel '{kernel}' did not finish within {timeout_seconds():g} s and was stopped "
                "(an endless loop, or a barrier some threads never reach?); HLH_MLX_EMU_TIMEOUT sets the limit"
            ) from None
        except TooMuchOutput:
            kill_group(proc)
            raise KernelCrashError(f"[emulator] kernel '{kernel}' wrote more than {MAX_OUTPUT} bytes to its "
                                   "standard output or error and was stopped") from None
        except BaseException:
            kill_group(proc)
            raise
        _check(kernel, exe, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), source, header)
        with open(path, "rb") as f:
            data = f.read()
        return [data[r.offset:r.offset + r.nbytes] for r in regions]
    finally:
        os.close(fd)
        os.unlink(path)


MAX_OUTPUT = 1 << 20  # bytes the kernel process may write to stdout and to stderr


class TooMuchOutput(Exception):
    pass


def communicate_capped(proc: subprocess.Popen, spec: bytes | None, timeout: float) -> tuple[str, str]:
    """Like Popen.communicate, but a process that writes more than MAX_OUTPUT bytes to a
    pipe is stopped (TooMuchOutput): kernel code, or a compiler spelling out a type kernel
    text made exponentially long, must not be able to fill this process's memory."""
    import selectors
    import time

    if spec is not None:
        proc.stdin.write(spec)
        proc.stdin.close()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                buf += chunk
                if len(buf) > MAX_OUTPUT:
                    raise TooMuchOutput()
    proc.wait(max(0.0, deadline - time.monotonic()))  # TimeoutExpired: the caller kills the group
    for f in bufs:
        f.close()
    return (bufs[proc.stdout].decode(errors="replace"), bufs[proc.stderr].decode(errors="replace"))


def lockdown_report(stdout: str) -> dict | None:
    """What the kernel process reported about its lockdown, if it reported one first."""
    first = stdout.split("\n", 1)[0]
    if not first.startswith("HLH_LOCKED "):
        return None
    try:
        report = json.loads(first[len("HLH_LOCKED "):])
    except ValueError:
        return None
    from . import confine
    # Landlock (the loading window opens no user file) wherever this system has it
    required = ("no_new_privs", "seccomp", "probe") + (("landlock",) if confine.abi() >= 1 else ())
    return report if all(report.get(k) is True for k in required) else None


# Control characters (terminal escapes: clear screen, OSC 52 clipboard, a forged verdict)
# and invisible or reordering format characters: never quoted as they are.
_UNSAFE_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def quote_text(text) -> str:
    """Text from the kernel process, safe to show: every control character escaped."""
    return _UNSAFE_CHARS.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100
                             else f"\\u{ord(m.group(0)):04x}", str(text))


# Every fault kind the launcher itself reports; anything else is a forged report.
FAULT_KINDS = frozenset({"sandbox", "object", "spec", "resources", "threadgroup-memory", "uninitialized",
                         "barrier-divergence", "out-of-bounds", "race", "inactive-lanes", "kernel-fault"})
WARN_KINDS = frozenset({"barrier-divergence"})


class _BadReport(Exception):
    pass


def _tagged(stderr: str, tag: str):
    for line in stderr.splitlines():
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1:])
            except (ValueError, RecursionError):
                raise _BadReport() from None
    return None


def _valid_threads(threads) -> bool:
    return isinstance(threads, list) and all(
        isinstance(t, dict) and all(isinstance(t.get(k), list) and len(t[k]) == 3 and
                                    all(isinstance(v, int) for v in t[k])
                                    for k in ("thread_position_in_grid", "threadgroup_position_in_grid"))
        and isinstance(t.get("thread_index_in_threadgroup"), int) for t in threads)


def _fault_report(stderr: str):
    """The launcher's fault report, checked: a known kind, text fields, well-formed threads."""
    fault = _tagged(stderr, "HLH_FAULT")
    if fault is None:
        return None
    if not (isinstance(fault, dict) and fault.get("kind") in FAULT_KINDS and isinstance(fault.get("what"), str)
            and _valid_threads(fault.get("threads", []))
            and (fault.get("pc") is None or (isinstance(fault["pc"], str) and re.fullmatch(r"0x[0-9a-f]+", fault["pc"])))
            and (not fault.get("site") or (isinstance(fault["site"], dict) and fault["site"].get("part") in
                                           ("source", "header") and isinstance(fault["site"].get("line"), int)))):
        raise _BadReport()
    fault["what"] = quote_text(fault["what"][:2000])
    return fault


def _warn_report(stderr: str) -> list:
    warns = _tagged(stderr, "HLH_WARN") or []
    if not (isinstance(warns, list) and all(isinstance(w, dict) and w.get("kind") in WARN_KINDS and
                                            isinstance(w.get("what"), str) for w in warns)):
        raise _BadReport()
    return [(w["kind"], quote_text(w["what"][:2000])) for w in warns]


def _crash_report(stderr: str):
    crash = _tagged(stderr, "HLH_CRASH")
    if crash is None:
        return None
    if not (isinstance(crash, dict) and isinstance(crash.get("signal"), int) and _valid_threads(crash.get("threads", []))):
        raise _BadReport()
    try:
        signal.Signals(crash["signal"])
    except ValueError:
        raise _BadReport() from None
    return crash


def _check(kernel: str, exe: Path, proc: subprocess.CompletedProcess, source: str, header: str) -> None:
    try:
        _check_reports(kernel, exe, proc, source, header)
    except _BadReport:
        raise KernelCrashError(
            f"[emulator] kernel '{kernel}': the kernel process wrote a malformed or forged fault report "
            f"(exit {proc.returncode}); its results are not used") from None


def _check_reports(kernel: str, exe: Path, proc: subprocess.CompletedProcess, source: str, header: str) -> None:
    locked = lockdown_report(proc.stdout)
    fault = _fault_report(proc.stderr)
    if fault and fault["kind"] in ("sandbox", "object"):
        raise EmulatorError(f"[emulator] kernel '{kernel}' was not run: {fault['what']}")
    if locked is None and not (fault and fault["kind"] == "spec"):
        raise EmulatorError(
            f"[emulator] kernel '{kernel}': the kernel process did not report itself sandboxed "
            f"(exit {proc.returncode}); its results are not used")
    for kind, what in _warn_report(proc.stderr):
        warnings.warn(f"[emulator] kernel '{kernel}': {kind}: {what}", RuntimeWarning, stacklevel=5)
    if proc.returncode == 0:
        if "HLH_DONE" not in proc.stdout:
            raise EmulatorError(f"[emulator] kernel '{kernel}' exited before finishing the dispatch")
        return
    if fault and fault["kind"] in ("spec", "resources"):
        raise EmulatorError(f"[emulator] kernel '{kernel}': {fault['what']}")
    if fault and fault["kind"] == "threadgroup-memory":
        raise ValueError(f"[metal_kernel] kernel '{kernel}': {fault['what']}")
    if fault:
        if fault.get("site"):
            where, line = fault["site"]["part"], fault["site"]["line"]
            lines = (source if where == "source" else header).splitlines()
            text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        else:
            where, line, text = source_line(exe, fault.get("pc"), source, header)
        raise SanitizerError(kernel, fault["kind"], fault["what"], where, line, text, fault.get("threads", []))
    crash = _crash_report(proc.stderr)
    if crash:
        sig = signal.Signals(crash["signal"]).name
        who = ""
        if crash.get("threads"):
            t = crash["threads"][0]
            who = f" in thread {tuple(t['thread_position_in_grid'])}"
        hint = " (stack overflow: too much private memory per thread?)" if crash.get("stack_overflow") else (
            " (an out-of-bounds access? run with sanitize=True)" if sig in ("SIGSEGV", "SIGBUS") else "")
        raise KernelCrashError(f"[emulator] kernel '{kernel}' crashed with {sig}{who}{hint}")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = (" (a forbidden system call: the kernel tried to reach outside its sandbox, which stopped it)"
               if sig == "SIGSYS" else " (CPU-time limit)" if sig == "SIGXCPU" else
               " (out of memory or CPU-time limit?)" if sig == "SIGKILL" else "")
        raise KernelCrashError(f"[emulator] kernel '{kernel}' was killed by {sig}{why}")
    raise KernelCrashError(f"[emulator] kernel '{kernel}' failed (exit {proc.returncode}): "
                           f"{quote_text(proc.stderr[-2000:])}")


def source_line(exe: Path, pc: str | None, source: str, header: str):
    """Map a code address of the kernel program to (part, line, text) of the kernel source."""
    import shutil

    tool = shutil.which("addr2line") or shutil.which("llvm-addr2line")
    if not pc or not tool:
        return None, None, ""
    if len(pc) > 18:  # "0x" and 16 digits: anything longer is no address of this process
        return None, None, ""
    addr = hex(int(pc, 16) - 1)  # return addresses point after the call
    # the object's debug sections are the kernel text's making: addr2line reads them
    # confined, with a time limit and its output capped, like every tool on kernel text
    from . import toolchain
    try:
        out = toolchain.confined_reader([tool, "-i", "-e", str(exe), addr], exe.parent, "mapping a fault to a line")
    except EmulatorError:
        return None, None, ""
    for entry in out.splitlines():
        path, _, rest = entry.rpartition(":")
        part = os.path.basename(path)
        if part in ("source", "header") and rest.split(" ")[0].isdigit():
            line = int(rest.split(" ")[0])
            lines = (source if part == "source" else header).splitlines()
            return part, line, lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return None, None, ""


def strided_region(arr: np.ndarray) -> tuple[bytes, int, list[int]]:
    """(bytes spanned by a strided view, offset of element 0 in them, strides in elements)."""
    item = arr.itemsize
    if arr.size == 0:
        return b"", 0, [0] * arr.ndim
    lo = sum(s * (n - 1) for s, n in zip(arr.strides, arr.shape) if s < 0)
    hi = sum(s * (n - 1) for s, n in zip(arr.strides, arr.shape) if s > 0) + item
    start = arr.__array_interface__["data"][0] + lo
    data = ctypes.string_at(start, hi - lo)
    return data, -lo, [s // item for s in arr.strides]
