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
    # NVIDIA H200 (SXM, 141 GB HBM3e). Copy bandwidth: device-to-device copy through PyTorch,
    # 4.3 TB/s counting bytes read + written; 8192^3 bf16 product 788 TFLOP/s; both measured
    # on lent H200s 2026-10-28/11-04 (device tool KINDS.md). fp32: 67 TFLOP/s, datasheet.
    "h200": {"bandwidth_gbs": 4300.0, "tflops": {"float16": 788.0, "bfloat16": 788.0, "float32": 67.0}},
}

# Apple GPUs, keyed by mx.device_info()["architecture"] (applegpu_g<gen><tier>: gen 13 = M1,
# 14 = M2, 15 = M3, 16 = M4; tier g = base, s = Pro, c = Max, d = Ultra). Vendor and
# third-party figures gathered in shared/DESIGN.md (not measured by us); where a range is
# published (binned parts) the lower bound is used. FP32 rates for M3/M4: hmc-tech.com's GPU
# pages (read 2026-11-25; shader count x 2 FLOP x clock): M3 Pro 14-core 5.01, M3 Max 30-core
# 10.74, M4 8-core 3.01, M4 Pro 16-core 6.02, M4 Max 32-core 13.74 TFLOP/s; M3 8-core (2.86)
# and M3 Ultra 60-core (21.5) computed the same way at M3's 1398 MHz. Half and bfloat are given
# the FP32 rate (Apple GPUs run them through the same ALUs).
_APPLE = {
    "g13g": (68, 2.6), "g13s": (200, 5.3), "g13c": (400, 10.6), "g13d": (800, 21.2),
    "g14g": (100, 3.6), "g14s": (200, 6.8), "g14c": (400, 13.6), "g14d": (800, 27.2),
    "g15g": (100, 2.86), "g15s": (150, 5.01), "g15c": (300, 10.74), "g15d": (819, 21.5),
    "g16g": (120, 3.01), "g16s": (273, 6.02), "g16c": (410, 13.74),
}
for _arch, (_bw, _tf) in _APPLE.items():
    CEILINGS[_arch] = {"bandwidth_gbs": float(_bw),
                       "tflops": {d: _tf for d in ("float32", "float16", "bfloat16")} if _tf else {}}


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
        if not c["tflops"].get(dtype):
            return None
        achieved = op.flops(shape) / (median_ms * 1e-3) / 1e12
        return 100.0 * achieved / c["tflops"][dtype]
    achieved = op.bytes(shape, DTYPES[dtype].size) / (median_ms * 1e-3) / 1e9
    return 100.0 * achieved / c["bandwidth_gbs"]
