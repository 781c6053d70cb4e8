"""Errors raised by the emulator. All are RuntimeError subclasses, as MLX's own are."""

from __future__ import annotations


class EmulatorError(RuntimeError):
    """Something stopped an emulated kernel: compiling, running, or a fault it made."""


class UnsafeKernelError(EmulatorError):
    """The kernel source uses a construct that could reach the host (refused unrun)."""


class KernelCompileError(EmulatorError):
    """The kernel body or header does not compile; names the line in the kernel source."""

    def __init__(self, kernel: str, where: str | None, line: int | None, message: str, text: str, log: str):
        self.kernel, self.where, self.line, self.message, self.log = kernel, where, line, message, log
        loc = f"{where} line {line}" if where else "generated code"
        detail = f"\n    {text}" if text else ""
        super().__init__(f"[emulator] kernel '{kernel}' does not compile: {loc}: {message}{detail}")


class KernelCrashError(EmulatorError):
    """The emulated kernel crashed (bad memory access, trap) or broke the sandbox."""


class KernelTimeoutError(EmulatorError):
    """The emulated kernel did not finish in time (an endless loop, a barrier that never opens)."""


class SanitizerError(EmulatorError):
    """A fault the sanitizer found: race, out-of-bounds, uninitialized, barrier-divergence.

    Attributes: kind, line (kernel source line or None), where ("source"/"header"),
    threads (list of dicts with thread_position_in_grid etc.).
    """

    def __init__(self, kernel: str, kind: str, what: str, where: str | None, line: int | None,
                 text: str, threads: list[dict]):
        self.kernel, self.kind, self.what, self.where, self.line, self.threads = (
            kernel, kind, what, where, line, threads)
        loc = f" at {where} line {line}" if line else ""
        src = f"\n    {text}" if text else ""
        who = "; ".join(
            f"thread {tuple(t['thread_position_in_grid'])} (threadgroup "
            f"{tuple(t['threadgroup_position_in_grid'])}, index {t['thread_index_in_threadgroup']})"
            for t in threads)
        super().__init__(f"[emulator] {kind} in kernel '{kernel}'{loc}: {what}{src}\n    threads: {who}")
