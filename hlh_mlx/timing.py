"""Timing on a real GPU backend: warm-up out of the numbers, batched launches, medians.

MLX is lazy, so one timed sample is: build `batch` calls into one graph, `mx.eval` it,
`mx.synchronize()`. Dividing by `batch` removes per-launch host overhead from small
kernels. The batch grows until a sample lasts `target_ms`. Inputs smaller than the L2
cache rotate among several copies so repeated calls do not just read the cache; when
memory does not allow enough copies the result says `cache_resident`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx

# Bumped whenever how we time changes, so a rerun measures again instead of resuming
# (2: >= 2 input sets, >= 4x the L2 in all; 3: input sets filling ROTATE_BYTES).
METHOD = 3
# Input copies to cycle through. Measured on the H100 (benchmarks/gemv_sets_probe.py,
# 2026-11-25): a gemv streaming a 117 MB weight read at 5.2 TB/s with 2 copies, 4.2 TB/s
# with 8 (936 MB) and 2.97 TB/s, the DRAM rate, only with 16 (1.9 GB): the L2 keeps part
# of a weight from one call to the next unless ~40x its size streams in between.
ROTATE_BYTES = 2 * 2**30
MAX_SETS = 64


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    batch: int
    repeats: int
    input_sets: int
    cache_resident: bool

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy this measurement is."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": round(self.spread, 4)}


def input_sets(make, nbytes: int) -> tuple[list, bool]:
    """Independent input sets filling ROTATE_BYTES, cycled so no call finds its inputs in
    the L2 (see ROTATE_BYTES). When MAX_SETS copies of small inputs cannot fill it, the
    timing is labelled cache_resident: some of it may come from the cache."""
    want = max(2, -(-ROTATE_BYTES // max(nbytes, 1)))
    n = min(want, MAX_SETS)
    first = make()
    # the copies need their own memory, not their own values: a device-side copy costs
    # milliseconds where making 2 GB of random inputs on the host cost ~20 s per shape
    sets = [first] + [[a + 0 for a in first] for _ in range(n - 1)]
    mx.eval(sets)
    return sets, n < want


def measure(fn, sets: list, *, cache_resident: bool, warmup: int = 2, repeats: int = 11,
            target_ms: float = 20.0, max_batch: int = 500) -> Timing:
    """Median time of one call of `fn(*inputs)` over `repeats` batched samples."""
    def sample(batch: int) -> float:
        outs = [fn(*sets[i % len(sets)]) for i in range(batch)]
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        return (time.perf_counter() - t) * 1e3

    for _ in range(warmup):
        sample(1)
    one = min(sample(1) for _ in range(3))
    batch = int(max(1, min(max_batch, target_ms / max(one, 1e-3))))
    times = sorted(sample(batch) / batch for _ in range(repeats))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return Timing(statistics.median(times), q[0], q[-1], batch, repeats, len(sets), cache_resident)
