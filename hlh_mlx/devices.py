"""Roofline ceilings per device: memory bandwidth and arithmetic peak, with sources.

Measured numbers win over datasheets: a kernel's "% of roofline" is against what the
card can actually do. Keys are matched as substrings of the device slug.
"""

from __future__ import annotations

CEILINGS = {
    # NVIDIA H100 80GB HBM3 (SXM). Copy bandwidth: device-to-device copy through MLX 0.32.4,
    # counting bytes read + written, measured on the lent card 2026-11-25 (shared/DESIGN.md).
    # Dense fp16/bf16: 8192^3 bf16 product through PyTorch, 798 TFLOP/s, measured on a lent
    # H100 2026-11-13 (device tool KINDS.md). fp32 (no tensor cores): 67 TFLOP/s, datasheet.
    "h100": {"bandwidth_gbs": 2920.0, "tflops": {"float16": 798.0, "bfloat16": 798.0, "float32": 67.0}},
}


def ceilings(device_slug: str) -> dict | None:
    for key, value in CEILINGS.items():
        if key in device_slug:
            return value
    return None


def roofline_pct(device_slug: str, op, shape: dict, dtype: str, median_ms: float) -> float | None:
    """Percent of the device's floor for this op and shape (None when the device is unknown)."""
    c = ceilings(device_slug)
    if not c or not median_ms:
        return None
    from .ops.spec import DTYPES
    if op.bound == "compute":
        achieved = op.flops(shape) / (median_ms * 1e-3) / 1e12
        return 100.0 * achieved / c["tflops"][dtype]
    achieved = op.bytes(shape, DTYPES[dtype].size) / (median_ms * 1e-3) / 1e9
    return 100.0 * achieved / c["bandwidth_gbs"]
