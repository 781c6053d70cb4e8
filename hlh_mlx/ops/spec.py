"""The op spec: one object per op, the whole story of what 'correct' and 'fast' mean."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

Shape = dict  # {"M": 64, "N": 64, "K": 64}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Normwise relative error allowed for ops computed in float32 and rounded once to the
# output dtype: float32 differs only in operation order; half types add one rounding.
ROUNDED_ONCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype} (one of {', '.join(DTYPES)})") from None


def parse_shape(dims: tuple[str, ...], text: str, flags: tuple[str, ...] = ()) -> Shape:
    """'64x32x16' (in the op's dim order) or 'M=64,N=32,K=16'; `flags` are 0/1 dims."""
    text = text.strip()
    if "=" in text:
        out = {}
        for part in text.split(","):
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    else:
        values = re.split(r"[x×,]", text)
        if len(values) != len(dims):
            raise ValueError(f"shape {text!r} needs {len(dims)} sizes ({'x'.join(dims)})")
        out = dict(zip(dims, values))
    if set(out) != set(dims):
        raise ValueError(f"shape {text!r} must give {', '.join(dims)}")
    try:
        shape = {k: int(out[k]) for k in dims}
    except ValueError:
        raise ValueError(f"shape {text!r}: sizes must be integers") from None
    for k, v in shape.items():
        if k in flags and v not in (0, 1):
            raise ValueError(f"shape {text!r}: {k} is a flag, 0 or 1")
        if k not in flags and v < 1:
            raise ValueError(f"shape {text!r}: sizes must be positive ({k}={v})")
    return shape


def shape_str(dims, shape: Shape) -> str:
    return "x".join(str(shape[d]) for d in dims)


@dataclass(frozen=True)
class OpSpec:
    """What an op computes and how to judge a kernel for it.

    Args:
      name: the op (templates live in templates/<name>/).
      dims: the shape variables templates and shapes use, e.g. ("M", "N", "K").
      make_inputs: (shape, dtype, rng) -> input arrays, random, never all zeros.
      reference: what outputs are compared with (the built-in, in float32 for half inputs).
      builtin: what the sweep times as the baseline: the MLX call users make today, in the
        input dtype (default: reference). Never upcast here: casts would inflate speedups.
      output_shapes / output_dtypes: of the kernel's outputs.
      tolerance: per dtype name, the largest normwise relative error ||y - ref|| / ||ref||.
      magnitude: for sums of products (dot products, matmuls): inputs -> per output, the
        root sum of squares of the products it sums (sqrt(x^2 @ (w^2).T)), the size that
        rounding error scales with. The error's denominator is then the larger of ||ref||
        and ||magnitude||: the same as ||ref|| for typical outputs, but a dot product that
        cancels to nearly zero is not failed for rounding that any summation order has.
      bytes / flops: (shape, dtype) -> the minimum traffic and arithmetic, for the roofline.
      shapes: default shapes to tune on a GPU; emulator_shapes: small ones for the emulator.
      edge_shapes: awkward sizes every variant must also get right.
      function: the MLX function the op replaces, with the user's arguments (mx.fast.rms_norm).
      bind: (*args, **kwargs) of `function` -> a Call, or a string
        saying why a tuned kernel cannot serve these arguments (hlh_mlx.tuned then runs
        the built-in and records the reason). hlh_mlx.tuned calls it once per distinct
        call to decide, then again inside the compiled launch plan with traced arrays:
        it may check shapes, dtypes and plain values, reshape arrays, and build constant
        arrays, but must not read an array's values (`.item()`, `.tolist()`).
    """
    name: str
    dims: tuple[str, ...]
    make_inputs: Callable
    reference: Callable
    output_shapes: Callable
    tolerance: dict
    bytes: Callable
    flops: Callable
    shapes: list[Shape]
    emulator_shapes: list[Shape]
    edge_shapes: list[Shape]
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    output_dtypes: Callable = field(default=lambda dtype: [dtype])
    builtin: Callable | None = None
    # (shape) -> fn(*inputs) -> outputs: the built-in as a program calls it at this shape,
    # its static arguments bound once (what the sweep times, host cost included); default:
    # `builtin`. Needed where `builtin` must read values from inputs (rope's offset).
    builtin_for: Callable | None = None
    bind: Callable | None = None
    # the MLX function the op replaces, called with the user's arguments: what
    # hlh_mlx.tuned.<op> runs when no variant serves a call (bind maps those arguments)
    function: Callable | None = None
    # for exported kernels: each dim as a Python expression of the kernel inputs, and each
    # output shape as an expression of the dims
    export_dims: dict = field(default_factory=dict)
    export_outputs: list = field(default_factory=list)
    # each input's shape as a tuple expression of the dims, where it is not simply a tuple of
    # dims (e.g. qgemv's packed weight "(N, K // 8)"); default: read off made inputs
    export_inputs: list = field(default_factory=list)
    # arguments of the MLX function whose value changes from call to call (rope's offset):
    # name -> a converter of a Python value to the array the kernel reads. hlh_mlx.tuned
    # keeps them out of a plan's signature and passes them as data; bind must accept them
    # as arrays without reading their values.
    dynamic: dict = field(default_factory=dict)
    bound: str = "memory"  # which roofline applies: "memory" or "compute"
    magnitude: Callable | None = None
    # dims that are 0/1 switches of the op (rope's TRAD, norm_qkv_rope's B), not sizes: selection
    # never serves one setting from the other's records (the built-in differs too)
    flags: tuple[str, ...] = ()
    # an op computed by a kernel and then MLX ops (qmm: the kernel dequantizes the weight,
    # MLX's matmul multiplies): (inputs, kernel outputs) -> the op's outputs, run after every
    # launch (check, timing, hlh_mlx.tuned), so what is checked and timed is the whole op.
    # The kernel writes kernel_output_shapes (default: output_shapes); an element it leaves
    # unwritten still shows, its poison reaching the op's outputs. export_then: `then` as a
    # Python expression of the input names and `outs`, for exported modules.
    then: Callable | None = None
    kernel_output_shapes: Callable | None = None
    export_then: str = ""
    # other ops of the same MLX function that take the calls this op's bind refuses (qgemv
    # takes one token, qmm several rows): hlh_mlx.tuned tries them in order, so one
    # `tuned.quantized_matmul` serves a decode step and a prefill
    also: tuple[str, ...] = ()
    # with `also`: a cheap test, on `function`'s arguments, that a call is this op's own (qgemv:
    # one row), so that where only the `also` ops have tuned variants on a device this op's
    # calls can go straight to the built-in, with no signature built
    takes: Callable | None = None

    def kernel_shapes(self, shape: Shape) -> list:
        """The shapes of what a kernel of this op writes."""
        return (self.kernel_output_shapes or self.output_shapes)(shape)

    def complete(self, inputs, outs):
        """A kernel's outputs as the op's: `then` applied, where the op has one."""
        return outs if self.then is None else self.then(inputs, outs)

    def finished(self, launch):
        """`launch` (inputs -> the kernel's outputs) as the whole op."""
        then = self.then
        if then is None:
            return launch

        def run(*inputs):
            return then(inputs, launch(*inputs))
        return run

    def baseline(self, *inputs):
        return (self.builtin or self.reference)(*inputs)

    def baseline_for(self, shape: Shape):
        """The built-in to time at this shape (see builtin_for)."""
        return self.builtin_for(shape) if self.builtin_for else self.baseline

    def check_shape(self, shape: Shape) -> None:
        if set(shape) != set(self.dims):
            raise ValueError(f"[{self.name}] shape must give {', '.join(self.dims)}, got {shape}")

    def parse_shape(self, text: str) -> Shape:
        try:
            return parse_shape(self.dims, text, self.flags)
        except ValueError as e:
            raise ValueError(f"[{self.name}] {e}") from None

    def shape_str(self, shape: Shape) -> str:
        return shape_str(self.dims, shape)


@dataclass
class Call:
    """User arguments mapped onto the op: kernel inputs, the op's shape, and the shapes the
    caller gets the outputs in (a kernel writes flat memory, so its outputs are allocated
    in the caller's shape directly: no reshape node after the launch)."""
    inputs: list
    shape: Shape
    dtype: str
    out_shapes: list | None = None  # default: the op's output_shapes(shape)
    finish: Callable = field(default=lambda outs: outs[0])


def as_shape(x, shape: tuple):
    """x viewed with `shape` (no graph node when it already has it)."""
    return x if x.shape == tuple(shape) else x.reshape(shape)


# The 4-bit affine group sizes the quantized templates take (mx.quantize's layout)
QUANT_GROUPS = (64, 128)


def affine_4bit_reason(x, weights, group_size, bits, name: str = "x", same_dtype: dict | None = None) -> str | None:
    """Why tuned kernels cannot take activations `x` with 4-bit affine `weights` ((packed,
    scales, biases) triples) at this group size, or None: the checks every quantized op's
    bind starts with. `same_dtype`: other arrays, by name, that must be in x's dtype."""
    if bits != 4 or group_size not in QUANT_GROUPS:
        return f"tuned kernels take bits=4 and group_size in {QUANT_GROUPS} (got bits={bits}, group_size={group_size})"
    if any(s is None or b is None for _, s, b in weights):
        return "scales and biases of every weight are needed (affine mode)"
    if x.dtype not in DTYPES.values():
        return f"{name}'s dtype {x.dtype} has no tuned kernels"
    others = same_dtype or {}
    if any(not isinstance(a, mx.array) or a.dtype != x.dtype
           for a in (*[a for _, s, b in weights for a in (s, b)], *others.values())):
        return f"{', '.join([name, *others])}, the scales and biases must share one dtype"
    if any(w.dtype != mx.uint32 for w, _, _ in weights):
        return "the packed weights must be uint32 (4-bit)"
    return None


# MLX's CUDA allocator keeps arrays of at most this many bytes in a pool of managed memory
# (host pages the GPU reads in place), whoever writes them
HOST_POOL_BYTES = 8
MAX_CONSTANTS = 1024  # distinct constants kept (a caller varying a scale every call must not grow it without end)
_constants: dict = {}


def is_number(v) -> bool:
    """A finite real number (numpy's too), not an array or a bool: what a kernel takes as a constant."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def maker_stream():
    """Where the runtime makes a constant: the GPU where there is one (device memory),
    whatever stream the caller is in."""
    return mx.gpu if mx.is_available(mx.gpu) else mx.cpu


def constant(values, dtype) -> mx.array:
    """`values` (a list) as a kernel input in memory a GPU op wrote, made once per values
    and dtype. MLX's CUDA back end keeps an array of 8 bytes or fewer made on the host
    (`mx.array([eps])`) in a pool of managed memory (its small-size pool) that the GPU reads across
    the bus: a kernel that reads such a scalar in every warp waits on that read in every
    warp. Copied by a GPU op into a longer array, the same values live in device memory.
    Cached: every layer of a decode step asks for the same eps, and a fresh array per call
    would cost the host an allocation too. The same array every call: an op's random
    inputs take `input_constant` (a view of their own), so nobody hands the runtime's
    constant to mx.compile as an input beside a tuned call that captures it."""
    return _constant(values, dtype)[1]


def input_constant(values, dtype) -> mx.array:
    """`constant(values, dtype)` for an op's random inputs: the same device memory, a view of
    its own (a caller may compile a function taking it beside a tuned call that captures the
    runtime's constant: MLX refuses a trace that reads one array as both)."""
    base, a = _constant(values, dtype)
    return base[: a.size]  # a new slice of the longer array (a whole slice of `a` is `a` itself)


def _constant(values, dtype) -> tuple:
    """(the longer array, the view of its front) for `values`, made and cached on first use."""
    # ints as ints (float() would merge 2**53 and 2**53 + 1), floats by their bits (-0.0 is
    # not 0.0, and every NaN is one key)
    key = (tuple(v if isinstance(v, int) else float(v).hex() for v in values), dtype)

    def make():
        host = mx.array(list(values), dtype=dtype)
        base = mx.concatenate([host, mx.zeros((HOST_POOL_BYTES,), dtype)], stream=maker_stream())
        return base, base[: host.size]
    return _cached(key, make)


def zeros(n: int, dtype) -> mx.array:
    """n zeros as a kernel input (an absent bias), made once per (n, dtype) in device memory
    and cached: a model's every layer asks for the same ones. An op's random inputs make
    their own (`mx.zeros`): see input_constant for why they must not share the runtime's."""
    return _cached(("zeros", n, dtype), lambda: (mx.zeros((n,), dtype, stream=maker_stream()),))[0]


def _cached(key, make) -> tuple:
    """make()'s arrays, made, evaluated and kept on first use of `key`."""
    entry = _constants.get(key)
    if entry is None:
        if len(_constants) >= MAX_CONSTANTS:
            _constants.clear()  # traces and plans that captured one keep their own reference
        entry = _constants[key] = make()
        mx.eval(*entry)  # made here once, never a node of a caller's graph (or of a compiled trace)
    return entry


def random_array(rng: np.random.Generator, shape, dtype, scale=1.0) -> mx.array:
    """Standard normal values (never zeros), cast to dtype."""
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def rowwise(name: str, first_input: str, **fields) -> OpSpec:
    """An op over the rows of an (R, C) array, with the shape story row ops share (outputs
    like the input, LLM-sized default shapes, awkward edge shapes); `fields` override."""
    defaults = dict(
        dims=("R", "C"),
        output_shapes=lambda s: [(s["R"], s["C"])],
        tolerance=ROUNDED_ONCE,
        shapes=[{"R": 8192, "C": 4096}, {"R": 1, "C": 4096}],
        emulator_shapes=[{"R": 8, "C": 512}],
        edge_shapes=[{"R": 1, "C": 1}, {"R": 3, "C": 1001}],
        export_dims={"R": f"{first_input}.shape[0]", "C": f"{first_input}.shape[1]"},
        export_outputs=["(R, C)"],
    )
    return OpSpec(name=name, **{**defaults, **fields})
