"""Run `mx.fast.metal_kernel` bodies on any machine, with Metal's semantics, on the CPU.

    from hlh_mlx import emulator
    k = emulator.metal_kernel(name="exp", input_names=["inp"], output_names=["out"],
                              source="uint i = thread_position_in_grid.x; out[i] = exp(inp[i]);")
    (y,) = k(inputs=[x], grid=(x.size, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[x.shape], output_dtypes=[x.dtype])

`install()` makes `mx.fast.metal_kernel` itself resolve here where MLX has no Metal
back end, so unmodified MLX kernel code runs on Linux. Timings of emulated kernels
mean nothing about GPU speed; the emulator is for correctness.
"""

from __future__ import annotations

import mlx.core as mx

from .errors import (EmulatorError, KernelCompileError, KernelCrashError, KernelTimeoutError,
                     SanitizerError, UnsafeKernelError)
from .kernel import MetalKernel, metal_kernel

__all__ = ["metal_kernel", "MetalKernel", "install", "uninstall", "installed", "EmulatorError",
           "KernelCompileError", "KernelCrashError", "KernelTimeoutError", "SanitizerError", "UnsafeKernelError"]

_original = None


def has_metal() -> bool:
    return bool(getattr(mx, "metal", None) and mx.metal.is_available())


def install() -> bool:
    """Route `mx.fast.metal_kernel` to the emulator when MLX has no Metal back end.

    Returns True when installed; on a Mac with Metal it changes nothing and returns False.
    """
    global _original
    if has_metal():
        return False
    if _original is None:
        _original = mx.fast.metal_kernel
        mx.fast.metal_kernel = metal_kernel
    return True


def uninstall() -> None:
    """Undo `install()`."""
    global _original
    if _original is not None:
        mx.fast.metal_kernel = _original
        _original = None


def installed() -> bool:
    return _original is not None
