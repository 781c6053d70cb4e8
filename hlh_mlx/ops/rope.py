"""rope: mx.fast.rope(x, D, traditional=TRAD, base, scale, offset) over x (R, T, D) with
all D dims rotated: pair i (of D/2) at position t turns by theta = (scale * (offset + t))
* inv_freq[i], inv_freq[i] = 2^(-(i / (D/2)) * log2(base)) as MLX computes it; pairs are
(i, i + D/2), or (2i, 2i + 1) when traditional.

Kernel inputs: x, inv_freq (D/2,) float32, pos (2,) float32 = [scale, traditional] and
offset (1,) int32: what a call chooses at run time travels as data, so one compiled
variant serves every base, offset and both layouts (offsets are exact in float32 below
2^24). The offset changes every decode step, so it is its own input: hlh_mlx.tuned passes
it as data to a plan made once (OpSpec.dynamic), never as part of the plan."""

import math
import threading

import mlx.core as mx
import numpy as np

from .spec import (ROUNDED_ONCE, Call, as_shape, OpSpec, constant, dtype_name, input_constant, is_number,
                   maker_stream, random_array)

BASE, SCALE, OFFSET = 10000.0, 1.0, 3


def inv_freq(d: int, base: float, make=constant) -> mx.array:
    """MLX's frequencies (exp2(-(i / half) * log2(base))), computed in float32; `make`:
    spec.constant (what the kernel reads) or spec.input_constant (an op's random inputs)."""
    half = d // 2
    i = np.arange(half, dtype=np.float32) / np.float32(half)
    return make(np.exp2(-i * np.float32(math.log2(base))).astype(np.float32).tolist(), mx.float32)


def _inputs(shape, dtype, rng):
    return [random_array(rng, (shape["R"], shape["T"], shape["D"]), dtype),
            inv_freq(shape["D"], BASE, input_constant), input_constant([SCALE, shape["TRAD"]], mx.float32),
            offset_input(OFFSET)]  # views of their own (spec.input_constant)


def _args(freqs, pos, offset):
    scale, trad = pos.tolist()
    return dict(traditional=bool(trad), base=None, scale=scale, offset=int(offset.item()), freqs=1.0 / freqs)


def _reference(x, freqs, pos, offset):
    return [mx.fast.rope(x.astype(mx.float32), x.shape[-1], **_args(freqs, pos, offset)).astype(x.dtype)]


def _builtin(x, freqs, pos, offset):
    scale, trad = pos.tolist()
    return [mx.fast.rope(x, x.shape[-1], traditional=bool(trad), base=BASE, scale=scale, offset=int(offset.item()))]


def _builtin_for(shape):
    kw = dict(traditional=bool(shape["TRAD"]), base=BASE, scale=SCALE, offset=OFFSET)
    d = shape["D"]
    return lambda x, *_: [mx.fast.rope(x, d, **kw)]


_positions: list = []


class _Last(threading.local):
    """This thread's last offset and its views: every layer of a decode step asks for the
    same one. Per thread: a view is a graph node of the thread that made it, which another
    thread's streams cannot evaluate (MLX raises "no Stream ... in current thread")."""
    item: list = []   # [offset, its (1,) view, its 0-d view or None]


_last_of = _Last()


def dynamic_offset(offset) -> mx.array | None:
    """The runtime's conversion of a call's int offset into data (OpSpec.dynamic), for the
    kernel and for the built-in alike (a traced call runs either): a 0-d view, or None where
    the kernel does not take the value (negative, past the exact float32 range, not an int):
    the built-in answers those."""
    if type(offset) is int:
        last = _last_of.item  # every layer of a step after the first: one read, no calls
        if last and last[0] == offset and last[2] is not None:
            return last[2]
        if 0 <= offset < 2 ** 24:
            return offset_scalar(offset)
    return None


def _offset_array(offset) -> mx.array:
    """[offset] as a view into a device-resident table of positions: a decode loop's
    offset changes every step, and a fresh host array per call costs a host-to-device copy
    in the GPU's timeline. `offset`: an int in [0, 2^24) (callers check). Shape (1,), as
    our kernels take it; MLX's own rope wants `offset_scalar` where a batch has more than
    one sequence."""
    last = _last_of.item
    if last and last[0] == offset:  # the same step's other layers: one slice, not one each
        return last[1]
    _last_of.item = [offset, _table(offset)[offset:offset + 1], None]
    return _last_of.item[1]


def offset_scalar(offset) -> mx.array:
    """`_offset_array(offset)` as a 0-d view: what mx.fast.rope is given. MLX accepts a
    (1,)-shaped offset as one offset for the whole batch, but its CUDA kernel reads it per
    sequence (offset[b], mlx/backend/cuda/rope.cu: the stride of a 1-d offset), so batch
    row b would turn by offset + b; a 0-d offset it broadcasts on every back end."""
    one = _offset_array(offset)
    last = _last_of.item
    if last[2] is None:
        last[2] = one.reshape(())
    return last[2]


def offset_as_data(offset, end: int = 2 ** 24):
    """The (1,) int32 offset a kernel reads (for an int, a view into device memory; an
    integer array's value stays data, never read here), or why the kernels cannot take it
    (a bind's message; the built-in answers). `end`: where positions stop being exact in
    float32 (2^24, less the tokens after the first). A bool is not taken as an int."""
    if isinstance(offset, mx.array):
        if offset.size != 1 or offset.ndim > 1:
            return "one offset for the whole batch"
        if offset.dtype != mx.int32:  # a wider one would wrap in the kernel's int32
            return f"offset of dtype {offset.dtype} (the kernels take int32 offsets)"
        return offset.reshape(1)
    if type(offset) is int and 0 <= offset < end:
        return _offset_array(offset)
    return f"offset must be an int in the exact float32 range [0, {end}) or an integer array"


def offset_input(offset: int) -> mx.array:
    """[offset] for an op's random inputs: a slice of the same table, never the array the
    runtime hands its kernels (a caller may compile a function taking it beside a tuned
    call: MLX refuses a trace that reads one array both ways)."""
    return _table(offset)[offset:offset + 1]


def _table(offset: int) -> mx.array:
    """The device-resident positions 0 .. n-1, n > offset (made by a GPU op, evaluated)."""
    if not _positions or offset >= _positions[0].size:
        n = max(1 << 16, 1 << int(offset).bit_length())
        _positions[:] = [mx.arange(n, dtype=mx.int32, stream=maker_stream())]
        mx.eval(_positions[0])
    return _positions[0]


_freqs: dict = {}


def bind(x, dims, *, traditional, base, scale, offset, freqs=None, **_):
    d = x.shape[-1]
    if d % 2:
        return "odd dims (the built-in raises: dims must be even)"
    if dims != d or x.ndim < 3:
        return "tuned rope rotates the whole last dimension of an input with at least 3 dims"
    if freqs is not None or base is None:
        return "tuned rope takes base=, not freqs="
    if not is_number(scale) or not is_number(base):
        return "scale and base as numbers (the kernel takes them as constants; the built-in also takes arrays)"
    off = offset_as_data(offset, 2 ** 24 - x.shape[-2])
    if isinstance(off, str):
        return off
    key = (d, float(base))
    if key not in _freqs:
        if len(_freqs) >= 64:
            _freqs.clear()  # a caller varying the base every call must not grow it without end
        _freqs[key] = inv_freq(d, base)
    pos = constant([scale, 1.0 if traditional else 0.0], mx.float32)
    t = x.shape[-2]
    return Call([as_shape(x, (x.size // (t * d), t, d)), _freqs[key], pos, off],
                {"R": x.size // (t * d), "T": t, "D": d, "TRAD": int(traditional)}, dtype_name(x.dtype), [x.shape])


OP = OpSpec(
    name="rope",
    dims=("R", "T", "D", "TRAD"),
    make_inputs=_inputs,
    reference=_reference,
    builtin=_builtin,
    builtin_for=_builtin_for,
    output_shapes=lambda s: [(s["R"], s["T"], s["D"])],
    # float32: an angle of up to T radians carries float32 rounding of about T * 6e-8, and
    # MLX's own back ends (CPU ops vs GPU kernels) differ from each other by that much
    tolerance={**ROUNDED_ONCE, "float32": 1e-4},
    bytes=lambda s, size: 2 * s["R"] * s["T"] * s["D"] * size,
    flops=lambda s: 6 * s["R"] * s["T"] * s["D"],
    shapes=[{"R": 32, "T": 4096, "D": 128, "TRAD": 0}, {"R": 32, "T": 1, "D": 128, "TRAD": 0},
            {"R": 32, "T": 4096, "D": 128, "TRAD": 1}],
    emulator_shapes=[{"R": 4, "T": 16, "D": 64, "TRAD": 0}, {"R": 4, "T": 16, "D": 64, "TRAD": 1}],
    edge_shapes=[{"R": 1, "T": 1, "D": 2, "TRAD": 0}, {"R": 3, "T": 7, "D": 10, "TRAD": 1},
                 {"R": 2, "T": 5, "D": 96, "TRAD": 0}],
    bind=bind,
    function=mx.fast.rope,
    dynamic={"offset": dynamic_offset},
    flags=("TRAD",),
    # TRAD travels in pos at run time: the exported kernel needs only the sizes
    export_dims={"R": "x.shape[0]", "T": "x.shape[1]", "D": "x.shape[2]"},
    export_inputs=["(R, T, D)", "(D // 2,)", "(2,)", "(1,)"],
    export_outputs=["(R, T, D)"],
)
