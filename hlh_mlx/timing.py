"""Timing on a real GPU backend, measured the way a program runs its ops.

A model's ops wait for each other: each consumes what the one before produced. MLX's CUDA
back end runs *independent* kernels concurrently, so a batch of independent calls measures
throughput under concurrency, which a kernel that under-fills the GPU can win while gaining
nothing in a model. The primary figure is therefore the **latency in a dependent chain**:
`batch` calls built into one graph, each call's first input fed from the previous call's
first output, then `mx.eval` + `mx.synchronize()`, divided by `batch`. Every output of every
call is evaluated: a built-in made of several ops (add_rms_norm's `x + r` then rms_norm)
would otherwise skip the ops whose outputs nothing reads, where a kernel writes them all. Inputs other than the
chained one rotate through copies filling ROTATE_BYTES, so no call finds them in the L2.

Beside it: the **host cost** of one call (building its graph, then MLX encoding its nodes
into GPU work), which a decode loop pays every token, and optionally the **throughput** of independent calls
(labelled as such, never used to rank).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx

from .ops.spec import HOST_POOL_BYTES

# Bumped whenever how we time changes, so a rerun measures again instead of resuming and
# older numbers are never ranked against newer ones (2: >= 2 input sets; 3: input sets
# filling ROTATE_BYTES; 4: latency in a dependent chain plus host cost per call; 5: host
# cost through the tuned call's dispatch path, not the kernel call's alone; 6: host cost
# includes MLX's encoding of the call's nodes, not only the graph building: a decode loop
# pays both on the host, and a custom kernel's node costs more to encode than a built-in's).
METHOD = 6
# Input copies to cycle through. Measured on the H100 (benchmarks/gemv_sets_probe.py): the
# L2 keeps part of a 117 MB weight from one call to the next unless ~40x its size streams
# in between, so copies fill 2 GB.
ROTATE_BYTES = 2 * 2**30
MAX_SETS = 64
HOST_CALLS = 200


@dataclass
class Timing:
    median_ms: float          # latency of one call in a dependent chain (or, mode="batch", throughput)
    p10_ms: float
    p90_ms: float
    batch: int
    repeats: int
    input_sets: int
    cache_resident: bool
    mode: str = "chain"       # "chain": each call consumes the previous output; "batch": independent calls
    link: str = "view"        # how a chained call gets the previous output: a "view" of it, or a "copy" into place
    host_us: float | None = None        # host time of one call: graph building + encoding (`host_parts`)
    encode_us: float | None = None      # the encoding part of host_us
    throughput_ms: float | None = None  # independent calls, per call (labelled; never ranked)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy this measurement is."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    @property
    def end_to_end_ms(self) -> float:
        """What one call costs a program that waits for it: chain latency plus host time."""
        return self.median_ms + (self.host_us or 0.0) / 1e3

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": round(self.spread, 4)}


def end_to_end_ms(timing: dict | None) -> float | None:
    """A stored timing's chain latency plus host cost (None when it has no timing)."""
    if not timing or timing.get("median_ms") is None:
        return None
    return timing["median_ms"] + (timing.get("host_us") or 0.0) / 1e3


def input_sets(make, nbytes: int) -> tuple[list, bool]:
    """Independent input sets filling ROTATE_BYTES, cycled so no call finds its inputs in
    the L2 (see ROTATE_BYTES). When MAX_SETS copies of small inputs cannot fill it, the
    timing is labelled cache_resident: some of it may come from the cache."""
    want = max(2, -(-ROTATE_BYTES // max(nbytes, 1)))
    n = min(want, MAX_SETS)
    first = make()
    # the copies need their own memory, not their own values: a device-side copy costs
    # milliseconds where making 2 GB of random inputs on the host cost ~20 s per shape.
    # Scalars (an eps, an offset) are shared: a copy of a few bytes lands in MLX's managed
    # pool, read across the bus, where a program passes the device-resident constant
    sets = [first] + [[a if a.nbytes <= HOST_POOL_BYTES else a + 0 for a in first] for _ in range(n - 1)]
    mx.eval(sets)
    return sets, n < want


def chain_ms(fn, inputs: list) -> float:
    """Median latency (ms) of fn(*inputs) in a dependent chain, copies of the inputs filling
    ROTATE_BYTES: for benchmarks timing MLX calls that are not an op spec's."""
    sets, resident = input_sets(lambda: inputs, sum(a.nbytes for a in inputs))
    return measure(fn, sets, cache_resident=resident).median_ms


def chained(previous: mx.array, x: mx.array) -> tuple[mx.array, str]:
    """x's place filled from `previous` (the last call's first output), so the call that
    reads it must wait for the call that wrote it. A view when `previous` has enough
    elements of x's dtype (no extra kernel); otherwise the previous output is copied over
    the front of x (one small copy kernel, paid by the built-in and every variant alike)."""
    if previous.dtype == x.dtype and previous.size >= x.size:
        return previous.reshape(-1)[: x.size].reshape(x.shape), "view"
    flat = previous.reshape(-1)[: x.size].astype(x.dtype)
    return mx.concatenate([flat, x.reshape(-1)[flat.size:]]).reshape(x.shape), "copy"


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _rest(out) -> list:
    """A call's outputs after the first (nothing for one output)."""
    return list(out[1:]) if isinstance(out, (list, tuple)) else []


def measure(fn, sets: list, *, cache_resident: bool, chain: bool = True, warmup: int = 2, repeats: int = 11,
            target_ms: float = 20.0, max_batch: int = 500) -> Timing:
    """Median time of one call of `fn(*inputs)` over `repeats` samples of `batch` calls:
    chained (each call's first input from the previous call's first output) or, with
    chain=False, independent (throughput)."""
    link = "view"

    def sample(batch: int) -> float:
        nonlocal link
        outs, rest, prev = [], [], None
        for i in range(batch):
            xs = sets[i % len(sets)]
            if chain and prev is not None:
                head, link = chained(prev, xs[0])
                xs = [head, *xs[1:]]
            out = fn(*xs)
            prev = _first(out)
            outs.append(prev)
            rest += _rest(out)  # outputs the chain does not read are still computed
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(*([outs[-1]] if chain else outs), *rest)
        mx.synchronize()
        return (time.perf_counter() - t) * 1e3

    for _ in range(warmup):
        sample(2)
    one = min(sample(1) for _ in range(3))
    batch = int(max(2 if chain else 1, min(max_batch, target_ms / max(one, 1e-3))))
    times = sorted(sample(batch) / batch for _ in range(repeats))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return Timing(statistics.median(times), q[0], q[-1], batch, repeats, len(sets), cache_resident,
                  mode="chain" if chain else "batch", link=link if chain else "none")


def host_us(fn, inputs: list, calls: int = HOST_CALLS) -> float:
    """Microseconds of host time one call costs a program: building its graph plus MLX
    encoding its nodes into GPU work (`host_parts`)."""
    build, encode = host_parts(fn, inputs, calls)
    return build + encode


ENCODE_BYTES = 2**30  # outputs one round of the encode timing may allocate


def host_parts(fn, inputs: list, calls: int = HOST_CALLS) -> tuple[float, float]:
    """(build, encode): microseconds per call, each the best of 5 rounds. build: `calls`
    calls' graphs built, nothing evaluated while the clock runs. encode: calls built, then
    `mx.async_eval` of all of them timed (it returns once every node is encoded and queued;
    the GPU runs after), as many calls as ENCODE_BYTES of outputs allow (at least 4).
    A program's loop pays both on the host before the GPU sees anything."""
    first = fn(*inputs)
    mx.eval(first)
    out_bytes = sum(a.nbytes for a in (first if isinstance(first, (list, tuple)) else [first]))
    best_build = best_encode = float("inf")
    n_encode = max(4, min(calls, ENCODE_BYTES // max(out_bytes, 1)))
    for _ in range(5):
        outs = []
        t = time.perf_counter()
        for _ in range(calls):
            outs.append(fn(*inputs))
        best_build = min(best_build, (time.perf_counter() - t) / calls * 1e6)
        outs = outs[:n_encode]
        t = time.perf_counter()
        mx.async_eval(outs)
        best_encode = min(best_encode, (time.perf_counter() - t) / n_encode * 1e6)
        mx.eval(outs)
        del outs
    return best_build, best_encode


def measure_all(fn, sets: list, *, cache_resident: bool, throughput: bool = False) -> Timing:
    """Chain latency, host cost, and (when asked) the throughput of independent calls."""
    t = measure(fn, sets, cache_resident=cache_resident, chain=True)
    build, encode = host_parts(fn, sets[0])
    t.host_us, t.encode_us = round(build + encode, 3), round(encode, 3)
    if throughput:
        t.throughput_ms = measure(fn, sets, cache_resident=cache_resident, chain=False).median_ms
    return t
