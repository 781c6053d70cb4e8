"""The dispatch path behind `hlh_mlx.tuned`: each distinct call resolved once into a plan.

A decode loop makes the same few calls thousands of times, so a call's cost must be what
the op costs, not what deciding costs. The first call with a given signature (array
shapes and dtypes, every other argument's value) binds it (validation in Python), chooses
(`select.choose`) and builds a plan; every later call is one dictionary lookup and the plan:

- the built-in, when no stored variant beats it end to end (counted once per distinct
  call in `fallbacks()`; an error under HLH_MLX_STRICT=1): after its first call the
  plan is the built-in itself, so a fallback costs the signature and the lookup only;
  and where no stored variant of the op beats the built-in at any shape on this device
  (`select.never_chosen`), the op's first call makes every later one the built-in
  directly, with no signature (strict mode off, outside `lenient` and `recording` blocks;
  for an op whose spec sends some calls on to other ops, `also`, its own calls where only
  those others are served, told apart by the spec's `takes`);
- the variant's kernel, launched with every argument worked out once, wrapped with the
  reshapes that map the caller's arrays onto the kernel's and, on back ends whose custom
  kernels `mx.compile` can replay (Metal, CUDA), compiled: the replay skips the Python
  of the binding and MLX's own per-call work of a custom-kernel call. Every op's plan
  carries the built-in's VJP (`mx.custom_function`) inside the compiled plan, so
  `mx.grad` works (a custom kernel has no derivative of its own); `no_grad` plans, for
  inference, leave it out (one graph node fewer: a gradient there raises).
- the built-in itself, when the built-in refuses the arguments (`builtin_refuses`): its
  own error, every call, strict mode or not (nothing runs, so nothing is counted).

On those back ends the signature is not built in Python either: after an op's first call,
its calls go to one `mx.compile`d function of the op (`Dispatch._trace`), whose own cache
(in C++: shapes, dtypes, the other arguments' values) is the lookup. A trace makes the
decision as above, once per distinct call, and the replay runs the plan: a variant's
kernel or the built-in, with nothing of this module's Python in between. Keyword arguments
reach it as positional values behind a number naming their keywords (MLX hashes a
keyword's name through Python on every call; a number costs nothing), and dynamic ones
(rope's offset) as data first, so a new offset is not a new trace. Ops called with several
keywords (rope, quantized_matmul) have entries with the built-in's own signature in
`hlh_mlx.tuned`, which skip even collecting the keywords (`_set_converters` keeps a keyword
set numbered before the op's conversions were known from passing a value as a constant). Arguments MLX cannot
trace (a numpy array, a stream), a call that raises, and an op that has traced MAX_TRACES
distinct calls (shapes that change every call) take the Python path below. Under mx.grad,
mx.vmap or inside another trace (a user's mx.compile, a patched block's halves) MLX runs
the trace for every call: decided from the remembered plans, and not counted as new.
(MLX's trace key holds True as 1: `precise=1` replays a `precise=True` trace where the
built-in would refuse the int; the answer is the built-in's for True.)

Arguments an op names as dynamic (rope's offset) change every call: they are not part of
the signature and reach the kernel as data.
"""

from __future__ import annotations

import threading
from collections import Counter

import mlx.core as mx

from . import backends, config, ops, select
from .ops.spec import DTYPES

_ARRAY = mx.array
_fallbacks: Counter = Counter()
_dispatches: list = []    # every Dispatch, so refresh() can forget their plans
_lenient_depth = [0]      # inside `lenient` blocks
_recording_depth = [0]    # inside `recording` blocks
generation = [0]          # bumped by refresh() and _rearm(): plans remembered outside a Dispatch are stale
_strict = [None]          # strict() as last worked out; None: work it out again
_kernels: dict = {}       # (variant id, back end) -> backends.Kernel
_backend: list = [None]   # this process's back end, found once
_slug: list = [None]      # its device's slug (the store's directory), found once
_choices: dict = {}       # (op, shape, dtype) -> select.Choice
MAX_PLANS = 4096          # e.g. one per sequence length of a prefill: stay bounded
# Distinct calls an op's compiled function may trace before the op goes back to the Python
# path: MLX looks a call up by comparing it with each stored trace in turn (a call at the
# 2000th shape of an op cost 10 us on the CPU box), and calls whose shapes change every time
# (attention over a growing cache) would pay a trace each. Decode loops use a few shapes.
MAX_TRACES = 64


class FallbackError(RuntimeError):
    """HLH_MLX_STRICT=1 and no tuned kernel serves this call."""


def backend() -> str:
    if _backend[0] is None:
        _backend[0] = backends.auto()
    return _backend[0]


def device_slug() -> str:
    """This process's device as the store names it (asking MLX for the device is not free)."""
    if _slug[0] is None:
        _slug[0] = backends.device(backend()).slug
    return _slug[0]


def compiled_for(backend_name: str, fn):
    """`fn` compiled where the back end's custom kernels can be traced and replayed."""
    return mx.compile(fn) if backend_name in backends.COMPILABLE else fn


def dispatched(fn, dynamic: tuple = ()):
    """`fn` behind a tuned call's hot path (as `tuned.<op>` runs it: the op's compiled
    function where the back end can replay custom kernels, else the signature and its
    lookup), so the sweep measures the host cost a program pays per call, not the kernel
    call's alone."""
    plans: dict = {}

    def decide(args, kwargs):
        plan = plans[signature(args, kwargs, dynamic)] = fn
        return plan
    owner = _Keywords(dynamic)
    if backend() in backends.COMPILABLE:
        def traced(kid, *flat):
            args, kwargs = owner.unflatten(kid, flat)
            return fn(*args, **kwargs)
        owner._traced = mx.compile(traced)
    return _hot_path(plans, decide, owner)


_KEYWORDS_LOCK = threading.Lock()


class _Keywords:
    """What the hot path reads of its owner (a Dispatch, or `dispatched`'s bare one): the
    op's compiled function (`_traced`, on back ends that replay kernels; None: the Python
    path), the built-in when it serves every call (`_direct`), the dynamic arguments
    (`_dynamic`, `_converters`: name -> OpSpec.dynamic conversion), and the keyword sets
    its calls use, each numbered once (a traced call passes the number and the values
    positionally)."""

    def __init__(self, dynamic: tuple = (), converters: dict | None = None):
        self._traced = None
        self._direct = None
        self._dynamic, self._converters = tuple(dynamic), dict(converters or {})
        self._kw: dict = {(): (0, ())}   # keyword names -> (number, dynamic positions)
        self._kw_names: list = [()]      # number -> keyword names

    def _set_converters(self, converters: dict) -> None:
        """The dynamic arguments' conversions, now known: keyword sets numbered before (an
        entry point's fixed set, made at import) get their dynamic positions re-derived, so
        no value of one reaches the compiled function as a constant (a trace per offset)."""
        with _KEYWORDS_LOCK:
            self._converters = dict(converters)
            self._kw = {names: (kid, self._dynamic_of(names)) for names, (kid, _) in self._kw.items()}

    def _dynamic_of(self, names: tuple) -> tuple:
        return tuple((i, self._converters[n]) for i, n in enumerate(names) if n in self._converters)

    def keywords(self, names: tuple) -> tuple:
        """(number, dynamic) for these keyword names: `dynamic` the (position, conversion)
        of each dynamic argument among them. Numbered under a lock: two threads' first
        calls with different keywords must not share a number."""
        with _KEYWORDS_LOCK:
            if names not in self._kw:
                self._kw_names.append(names)
                self._kw[names] = (len(self._kw_names) - 1, self._dynamic_of(names))
            return self._kw[names]

    def unflatten(self, kid: int, flat: tuple) -> tuple[tuple, dict]:
        names = self._kw_names[kid]
        if not names:
            return flat, {}
        n = len(flat) - len(names)
        return flat[:n], dict(zip(names, flat[n:]))


def _hot_path(plans: dict, decide, owner, direct: bool = True):
    """call(*args, **kwargs): `owner._traced` (the op's compiled function) where set, with
    the keywords numbered (`owner.keywords`) and dynamic values made data; else, or for an
    argument MLX cannot trace, the signature built inline (as `signature` builds it: a
    function call fewer), one lookup in `plans`, the plan; `decide(args, kwargs)` (which
    remembers the plan) on a miss or an unhashable argument. `owner._dynamic`: the dynamic
    argument names, read at a call with keywords (a Dispatch learns them on its first
    decision); `owner._direct`: when set, what every call runs, before anything else."""
    A, dk, vk = _ARRAY, _DKEY, _value_key

    def call(*args, **kwargs):
        to = owner._direct if direct else None
        if to is not None:  # an op no stored variant serves at any shape: the built-in
            return to(*args, **kwargs)
        traced = owner._traced
        if traced is not None:
            try:
                if not kwargs:
                    return traced(0, *args)
                kid, dynamic = owner._kw.get(tuple(kwargs)) or owner.keywords(tuple(kwargs))
                if not dynamic:
                    return traced(kid, *args, *kwargs.values())
                values = list(kwargs.values())
                for i, convert in dynamic:
                    if type(values[i]) is not A:
                        data = convert(values[i])
                        if data is not None:  # else the value as given (the built-in answers it)
                            values[i] = data
                return traced(kid, *args, *values)
            except Exception:
                # an argument MLX cannot trace (a numpy array, a stream; an int past int64
                # MLX fails to hash) or an error in the call itself: the Python path decides
                # it, and raises the built-in's own error where there is one
                pass
        key = []
        for a in args:
            if type(a) is A:
                key += (A, a.shape, dk(a.dtype))
            else:
                key += vk(a)
        if kwargs:
            dynamic = owner._dynamic
            for k, v in kwargs.items():
                key.append(k)
                if type(v) is A:
                    key += (A, v.shape, dk(v.dtype))
                else:
                    key += (type(v),) if k in dynamic else vk(v)
        try:
            plan = plans[tuple(key)]
        except (KeyError, TypeError):  # a first call, or an unhashable argument
            plan = decide(args, kwargs)
        return plan(*args, **kwargs)
    return call


def strict() -> bool:
    """A fallback is an error: HLH_MLX_STRICT=1 (read once; `config.reset()` re-reads it),
    except inside a `lenient` block."""
    if _strict[0] is None:
        _strict[0] = not _lenient_depth[0] and bool(config.get("HLH_MLX_STRICT"))
    return _strict[0]


class lenient:
    """Within this block a fallback is never an error (HLH_MLX_STRICT notwithstanding):
    for checks on made-up inputs, whose shapes nobody tuned for."""

    def __enter__(self):
        _lenient_depth[0] += 1
        _strict[0] = None
        _end_direct()  # every distinct call in here is decided: `hlh_mlx tune` records them so

    def __exit__(self, *exc):
        _lenient_depth[0] -= 1
        _strict[0] = None
        if not _lenient_depth[0] and _strict_now():
            _rearm()  # fallbacks settled in here may not run as the built-in out there
        else:
            _resume_direct()


class recording:
    """Within this block every distinct call is decided and counted as it comes, also for an
    op no stored variant serves anywhere (no direct path to the built-in): for reports of
    what a program calls (`hlh_mlx validate`'s warm-up), at a signature's cost per call."""

    def __enter__(self):
        _recording_depth[0] += 1
        _end_direct()

    def __exit__(self, *exc):
        _recording_depth[0] -= 1
        _resume_direct()


def _end_direct() -> None:
    for d in _dispatches:
        d._direct = None


def _resume_direct() -> None:
    """After a `recording` or `lenient` block: ops decided in it that no stored variant serves
    anywhere take the direct path again (their later calls find their plans remembered, so
    no new decision would set it)."""
    for d in _dispatches:
        if d.plans and d._direct is None and d._direct_path() is d.builtin:  # a router waits for its own call
            d._direct = d.builtin


def _strict_now() -> bool:
    """strict(), or True where the setting cannot be read (the next fallback raises why)."""
    try:
        return strict()
    except Exception:
        return True


def _settings_reset() -> None:
    _strict[0] = None
    _rearm()


def _value_key(v):
    """A value as a plan key holds it: with its type (-1.0 == -1 and True == 1, which the
    built-in tells apart); a stream or device by what it names (MLX hashes them by identity:
    a new object per call would be a new plan each call)."""
    t = type(v)
    return (t, str(v)) if t is _STREAM or t is _DEVICE else (t, v)


_STREAM, _DEVICE = mx.Stream, mx.Device


def _dtype_key():
    """How a signature holds a dtype: `hash` where that tells every MLX dtype apart (an int,
    hashed and compared with no call into MLX: a Dtype's own hash and == are; 0.3 us of a
    4-array lookup on the CPU box), else the Dtype itself."""
    dtypes = [v for v in vars(mx).values() if isinstance(v, mx.Dtype)]
    return hash if len({hash(d) for d in dtypes}) == len(dtypes) else (lambda d: d)


_DKEY = _dtype_key()


def signature(args: tuple, kwargs: dict, dynamic: tuple = ()) -> tuple:
    """What a plan depends on: each array's shape and dtype, every other value with its
    type; a dynamic argument only by kind (a number or an array). Flat, since it is built on every call
    (`_hot_path`, behind `tuned.<op>`, builds the same key inline)."""
    key = []
    dk = _DKEY
    for a in args:
        if type(a) is _ARRAY:
            key += (_ARRAY, a.shape, dk(a.dtype))
        else:
            key += _value_key(a)
    for k, v in kwargs.items():
        key.append(k)
        if type(v) is _ARRAY:
            key += (_ARRAY, v.shape, dk(v.dtype))
        else:
            key += (type(v),) if k in dynamic else _value_key(v)
    return tuple(key)


def _bind(op, args, kwargs):
    """The op's Call for these arguments, or why no tuned kernel serves them. Whatever the
    built-in accepts must reach it: an argument our binding cannot read is a reason to
    run the built-in (which gives its own answer or error), never a traceback from here."""
    first = args[0] if args else None
    if type(first) is _ARRAY:
        if first.dtype not in _TUNED_DTYPES:
            return f"dtype {first.dtype} has no tuned kernels (only {', '.join(DTYPES)})"
        if first.size == 0 or first.ndim == 0:
            return "empty or 0-d input"
    elif first is not None:
        return f"the first argument is a {type(first).__name__}, not an mx.array"
    if any(type(a) is _ARRAY and a.size == 0 for a in (*args, *kwargs.values())):
        return "an empty input"
    if kwargs.get("stream") is not None:
        return "a stream given (the built-in runs on it; a tuned kernel runs on the default stream)"
    try:
        return op.bind(*args, **kwargs)
    except (TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        return f"arguments the tuned kernels do not take ({type(e).__name__}: {e})"


_TUNED_DTYPES = frozenset(DTYPES.values())


def binding(op_name: str, args, kwargs):
    """(op, Call) for these arguments: the op's own binding, else that of the first op in its
    spec's `also` that takes them (a quantized_matmul of several rows is qmm's); where none
    does, (the op, why each refused)."""
    op = ops.get(op_name)
    call = _bind(op, args, kwargs)
    if not isinstance(call, str) or not op.also:
        return op, call
    reasons = {call: call}
    for other in op.also:
        spec = ops.get(other)
        got = _bind(spec, args, kwargs)
        if not isinstance(got, str):
            return spec, got
        reasons.setdefault(got, f"{other}: {got}")
    return op, "; ".join(reasons.values())


def choose(op_name: str, call) -> select.Choice:
    """The variant (or the built-in) for a bound call, remembered per shape and dtype."""
    if isinstance(call, str):
        return select.Choice(None, None, call)
    key = (op_name, tuple(call.shape.items()), call.dtype)
    if key not in _choices:
        be = backend()
        _choices[key] = select.choose(op_name, call, device_slug(), be)
    return _choices[key]


class _Fallback:
    """The built-in for a call no tuned kernel serves, until strict mode is known to be off.

    A remembered one (`dispatch` and `key` set) checks strict mode and counts the decision
    on its first call, then puts the built-in itself in its place among the plans: later
    calls cost the built-in's, no wrapper, check or count. Whatever can turn strict mode
    on again (`config.reset()`, leaving a `lenient` block) puts it back (`_rearm`). One not
    remembered (an unhashable argument, a trace on the emulator) checks and counts every call.
    """

    __slots__ = ("op_name", "reason", "builtin", "dispatch", "key")

    def __init__(self, op_name: str, reason: str, builtin, dispatch=None, key=None):
        self.op_name, self.reason, self.builtin = op_name, reason, builtin
        self.dispatch, self.key = dispatch, key

    def _check(self):
        if _strict[0] is None:
            strict()
        if _strict[0]:
            raise FallbackError(f"[hlh_mlx.tuned.{self.op_name}] HLH_MLX_STRICT=1 and the built-in would run: "
                                f"{self.reason}")

    def settle(self):
        """What runs from now on: strict mode checked (FallbackError), the decision counted
        once, and the built-in itself in this plan's place; this wrapper if not remembered."""
        if self.dispatch is None:
            return self
        self._check()
        counted = self.dispatch.counted  # the op's and its no_grad twin's: one call counts once
        if self.key not in counted:
            counted.add(self.key)
            _fallbacks[(self.op_name, self.reason)] += 1
        plans = self.dispatch.plans
        if plans.get(self.key) is self:  # still this call's plan (not forgotten by refresh())
            plans[self.key] = self.builtin
        return self.builtin

    def __call__(self, *args, **kwargs):
        if self.dispatch is None:
            self._check()
            _fallbacks[(self.op_name, self.reason)] += 1
            return self.builtin(*args, **kwargs)
        return self.settle()(*args, **kwargs)


def _fallback_plan(op_name: str, reason: str, builtin) -> _Fallback:
    return _Fallback(op_name, reason, builtin)


def _rearm() -> None:
    """Strict mode may be on again: every remembered fallback checks it on its next call,
    and plans remembered outside a Dispatch (layers, compiled blocks) are looked up again."""
    _end_direct()
    for d in _dispatches:
        if d.fallbacks:
            d.plans.update(d.fallbacks)
        if d._traced is not None:
            d._retrace()  # its traces ran fallbacks unchecked: decided again
    generation[0] += 1


def _kernel(variant):
    key = (variant.id, backend())
    if key not in _kernels:
        _kernels[key] = backends.Kernel(variant, backend())
    return _kernels[key]


def _array_slots(args, kwargs, dynamic):
    """Where the arrays (and dynamic values) are among the arguments: positions and names."""
    pos = tuple(i for i, a in enumerate(args) if type(a) is _ARRAY)
    names = tuple(k for k, v in kwargs.items() if type(v) is _ARRAY or k in dynamic)
    return pos, names


def _tuned_plan(op, choice, args, kwargs, call, builtin, differentiable: bool, name: str):
    """The variant's launch for this signature: caller's arrays in, caller's outputs out.
    `name`: the op the caller called (a fallback is counted under it: qgemv's, for a call
    its spec sends to qmm)."""
    # a Call's out_shapes are the caller's shapes of the op's outputs, which the kernel of
    # an op with `then` does not write
    shapes = op.kernel_shapes(call.shape) if op.then else call.out_shapes or op.output_shapes(call.shape)
    launch = op.finished(_kernel(choice.variant).launcher(call.shape, call.dtype, shapes,
                                                          op.output_dtypes(DTYPES[call.dtype])))
    pos, names = _array_slots(args, kwargs, op.dynamic)
    # the other arguments, without the first call's arrays (a plan must not keep a
    # prefill's activations alive)
    static_args = [None if i in pos else a for i, a in enumerate(args)]
    static_kwargs = {k: None if k in names else v for k, v in kwargs.items()}
    n_pos = len(pos)

    def rebuild(arrays):
        a, k = list(static_args), dict(static_kwargs)
        for i, x in zip(pos, arrays):
            a[i] = x
        for name, x in zip(names, arrays[n_pos:]):
            k[name] = x
        return a, k

    def forward(*arrays):
        a, k = rebuild(arrays)
        bound = op.bind(*a, **k)
        return bound.finish(launch(*bound.inputs))

    fn = forward
    if differentiable:
        fn = mx.custom_function(forward)

        data = [n_pos + j for j, n in enumerate(names) if n in op.dynamic]  # values, not variables

        def builtin_of(*arrays):
            a, k = rebuild(arrays)
            return builtin(*a, **k)

        @fn.vjp
        def _vjp(primals, cotangent, output):
            one = isinstance(primals, _ARRAY)  # MLX passes a single primal bare
            prim = [primals] if one else list(primals)
            # with respect to the float arrays: not dynamic values (data), not integer arrays
            # (indices, packed weights: the built-in has no derivative for them)
            wrt = [i for i in range(len(prim)) if i not in data and mx.issubdtype(prim[i].dtype, mx.inexact)]
            grads = mx.vjp(lambda *xs: builtin_of(*[xs[wrt.index(i)] if i in wrt else prim[i]
                                                    for i in range(len(prim))]),
                           [prim[i] for i in wrt],
                           list(cotangent) if isinstance(cotangent, (list, tuple)) else [cotangent])[1]
            full = [grads[wrt.index(i)] if i in wrt else mx.zeros_like(prim[i]) for i in range(len(prim))]
            return full[0] if one else tuple(full)
        # no JVP: MLX's forward mode takes every node's, the kernel's too (which has none:
        # mx.jvp raises, as for any custom kernel); tying the kernel's inputs off with
        # stop_gradient would cost a graph node per input on every call
    core = compiled_for(backend(), fn)
    if backend() not in backends.COMPILABLE:
        core = _eager_or_builtin(core, name, builtin, rebuild)
    dynamic = tuple(n for n in names if n in op.dynamic)

    if not names and pos == tuple(range(n_pos)):
        def plan(*args, **kwargs):
            return core(*args[:n_pos])
    else:
        def plan(*args, **kwargs):
            arrays = [args[i] for i in pos] + [kwargs[n] for n in names]
            for j, n in enumerate(names):
                if n in dynamic and type(arrays[n_pos + j]) is not _ARRAY:
                    data = op.dynamic[n](arrays[n_pos + j])
                    if data is None:  # a value bind would refuse (rope's offset -3): the built-in
                        # answers, checked and counted as any fallback (strict mode raises)
                        why = f"{n}={arrays[n_pos + j]!r} is not a value the kernel takes"
                        return _fallback_plan(name, why, builtin)(*args, **kwargs)
                    arrays[n_pos + j] = data
            return core(*arrays)
    return plan


def _eager_or_builtin(core, op_name: str, builtin, rebuild):
    """An eager kernel (the emulator computes on the host) cannot run inside a function
    the user compiles: there the built-in runs, counted as a fallback, instead of an error."""
    fallback = _fallback_plan(op_name, "the emulator's kernels cannot run inside mx.compile", builtin)

    def call(*arrays):
        try:
            return core(*arrays)
        except ValueError as e:
            if "transformations" not in str(e):
                raise
        a, k = rebuild(arrays)
        return fallback(*a, **k)
    return call


def builtin_refuses(builtin, args, kwargs) -> bool:
    """Whether the built-in raises for these arguments when its graph is built (an unknown
    keyword, a float where it takes an int, a stream this machine has not, an offset of
    two dimensions): then the tuned call is the built-in, which raises its own error, in
    strict mode too. Built, not evaluated: once per distinct call, never on the hot path."""
    try:
        builtin(*args, **kwargs)
    except Exception:
        return True
    return False


def resolve(op_name: str, builtin, args, kwargs, *, differentiable: bool = False):
    """The plan for these arguments (not remembered): the built-in or the variant."""
    if builtin_refuses(builtin, args, kwargs):
        return builtin, select.Choice(None, None, "the built-in refuses these arguments (its error is raised)")
    op, call = binding(op_name, args, kwargs)
    choice = choose(op.name, call)
    if choice.variant is None:
        return _fallback_plan(op_name, choice.reason, builtin), choice
    return _tuned_plan(op, choice, args, kwargs, call, builtin, differentiable, op_name), choice


class Dispatch(_Keywords):
    """One op's decisions: `Dispatch("rms_norm", mx.fast.rms_norm).function(x, w, eps)`.

    What users call (`tuned.<op>`) is `.function`, a plain function carrying this object's
    plans, `plan_for`, `no_grad` (its function) and `dispatch` (this object) as attributes:
    CPython calls a function with keywords directly, where an object's `__call__` costs a
    dictionary and a repacking of the arguments more (0.3 us of a call on the CPU box).
    """

    def __init__(self, op_name: str, builtin, *, differentiable: bool = False, doc: str = "",
                 dynamic: tuple | dict | None = None):
        # dynamic: the names of the op's dynamic arguments, or {name: conversion} (OpSpec.dynamic)
        super().__init__(dynamic or (), dynamic if isinstance(dynamic, dict) else None)
        self.op_name, self.builtin, self.differentiable = op_name, builtin, differentiable
        self.__doc__ = doc or f"hlh_mlx.tuned {op_name}, with the arguments of {builtin}."
        # the same op without the built-in's VJP attached: one graph node fewer per call,
        # for inference (hlh_mlx.nn layers in eval mode); a gradient through it is MLX's
        # error that custom kernels have no VJP
        self.no_grad = Dispatch(op_name, builtin, doc=self.__doc__, dynamic=dynamic) if differentiable else self
        self.counted = self.no_grad.counted if differentiable else set()  # signatures whose fallback was counted
        # both dictionaries are cleared, never replaced: `function` holds them
        self.plans: dict = {}      # signature -> plan (for a fallback, once settled, the built-in itself)
        self.fallbacks: dict = {}  # signature -> its _Fallback, to put back when strict mode may be on
        # the op's dynamic arguments (read from its spec on the first decision when not given:
        # ops load lazily); until then no plan exists and every lookup misses anyway
        self._dynamic_known = dynamic is not None
        self._traces = 0        # runs of `_trace` since the compiled function was made
        self._signatures = set()  # the distinct calls among them (bounded by MAX_TRACES)
        self._untraced = False  # MAX_TRACES reached: the Python path until refresh()
        self.function = _entry(self)
        # the hot path without the direct one, for a router's calls that are not the op's own
        self._undirected = _hot_path(self.plans, self._decide, self, direct=False)
        _dispatches.append(self)

    def _plan(self, args, kwargs, key=None):
        """The plan for these arguments, remembered per signature (`key`: theirs, where the
        caller has built it)."""
        if not self._dynamic_known:
            self._dynamic, self._dynamic_known = tuple(ops.get(self.op_name).dynamic), True
        try:
            if key is None:
                key = signature(args, kwargs, self._dynamic)
            return self.plans[key]
        except KeyError:  # first call with this signature
            pass
        except TypeError:  # an unhashable argument (a list, a numpy array): decide every call
            return resolve(self.op_name, self.builtin, args, kwargs, differentiable=self.differentiable)[0]
        plan = resolve(self.op_name, self.builtin, args, kwargs, differentiable=self.differentiable)[0]
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
            self.fallbacks.clear()
            self.counted.clear()
        if type(plan) is _Fallback:
            plan.dispatch, plan.key = self, key
            self.fallbacks[key] = plan
            direct = self._direct_path(args, kwargs)
            if direct is not None:  # counted once: this call (its plan settles below)
                self._direct = direct  # (a several-row fallback through a router leaves it in place)
        self.plans[key] = plan
        return plan

    def _decide(self, args, kwargs):
        """The hot path's miss: on a back end that replays kernels, the op's first call sets
        up its compiled function and goes through it (it decides there, when traced); else,
        or for arguments MLX cannot trace, the plan decided here in Python."""
        if self._traced is None and not self._untraced and backend() in backends.COMPILABLE:
            # the dynamic arguments reach it as data, and its traces build signatures with
            # them (ops load lazily: known from here on)
            dynamic = ops.get(self.op_name).dynamic
            self._dynamic, self._dynamic_known = tuple(dynamic), True
            self._set_converters(dynamic)
            self._retrace()
            return self.function
        return self._plan(args, kwargs)

    def _retrace(self) -> None:
        """A new compiled function for the op's later calls: every call is traced (decided)
        again on its first run."""
        self._traced, self._traces, self._signatures = mx.compile(self._trace), 0, set()

    def _trace(self, kid: int, *flat):
        """What `_traced` runs when MLX traces a call it has not seen: the plan (decided,
        or remembered from the Python path) applied to the tracers; the replay is the plan's
        graph alone."""
        args, kwargs = self.unflatten(kid, flat)
        self._traces += 1
        # distinct calls traced: MLX also runs this for every call under mx.grad or mx.vmap
        # or inside another trace (a patched block's), which adds no trace to this function
        key = signature(args, kwargs, self._dynamic)
        try:
            self._signatures.add(key)
        except TypeError:  # an unhashable value (a list): a trace of its own each time
            self._signatures.add(self._traces)
        if len(self._signatures) > MAX_TRACES:
            # shapes that keep changing: the Python path from the next call, and the traces
            # this function holds freed with it
            self._traced, self._untraced = None, True
        return self.plan_for(args, kwargs, key)(*args, **kwargs)

    def _direct_path(self, args=None, kwargs=None):
        """What the op's calls may run with no signature, or None (decide each distinct call):
        the built-in where no stored variant of the op, nor of the ops its spec sends calls on
        to (`also`), beats it at any shape here; where only those others have such variants and
        the spec tells its own calls cheaply (`takes`), a router: the built-in for its own
        calls, the decided path for the rest, once one of its own calls (`args`, `kwargs`:
        the fallback being decided) has been decided and counted. None while strict mode is
        on (checked now: whatever turns it on again resets `_direct`) and inside `lenient` and
        `recording` blocks (every distinct call is decided there: `hlh_mlx tune` records them so)."""
        if _lenient_depth[0] or _recording_depth[0] or _strict_now():
            return None
        spec, be, slug = ops.get(self.op_name), backend(), device_slug()
        if not select.never_chosen(self.op_name, slug, be):
            return None
        if all(select.never_chosen(name, slug, be) for name in spec.also):
            return self.builtin
        if spec.takes is None or args is None or not spec.takes(*args, **kwargs):
            return None
        takes, builtin, rest = spec.takes, self.builtin, self._undirected

        def route(*args, **kwargs):
            return builtin(*args, **kwargs) if takes(*args, **kwargs) else rest(*args, **kwargs)
        return route

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def plan_for(self, args: tuple, kwargs: dict, key=None):
        """The plan these arguments would run (for callers that remember it themselves, like
        a layer whose weights and settings do not change between calls): for a fallback the
        built-in itself, strict mode checked (FallbackError) and the fallback counted here.
        Valid while `generation` is unchanged. `key`: their signature, where built already."""
        plan = self._plan(args, kwargs, key)
        return plan.settle() if type(plan) is _Fallback else plan

    def __repr__(self) -> str:
        return f"<hlh_mlx.tuned {self.op_name}>"


def _entry(d: Dispatch):
    """The function behind `tuned.<op>`: the hot path over the Dispatch's plans."""
    return entry_function(_hot_path(d.plans, d._decide, d), d, None if d.no_grad is d else d.no_grad.function)


def entry_function(call, d: Dispatch, no_grad=None):
    """`call` as a `tuned.<op>` function of `d`: named as the op, carrying what callers read
    (`dispatch`, `plans`, `plan_for`, `no_grad`: `call` itself when None, ...)."""
    call.__name__, call.__qualname__, call.__module__ = d.op_name, f"hlh_mlx.tuned {d.op_name}", "hlh_mlx.tuned"
    call.__doc__ = d.__doc__
    call.dispatch, call.op_name, call.builtin, call.differentiable = d, d.op_name, d.builtin, d.differentiable
    call.plans, call.fallbacks, call.plan_for = d.plans, d.fallbacks, d.plan_for
    call.no_grad = call if no_grad is None else no_grad
    return call


def explain(op_name: str, *args, **kwargs) -> str:
    """Which variant (id, parameters, chain latency, host cost, the built-in's) or the
    built-in would run for these arguments, and why."""
    op, call = binding(op_name, args, kwargs)
    said = str(choose(op.name, call))
    return said if op.name == op_name else f"as {op.name}: {said}"


def serves(op_name: str, *args, **kwargs) -> bool:
    """Whether a stored variant (not the built-in) would run for these arguments: for callers
    choosing between a fused op and the separately tuned ops it replaces."""
    op, call = binding(op_name, args, kwargs)
    return choose(op.name, call).variant is not None


def expected_us(op_name: str, *args, **kwargs) -> float | None:
    """What one call with these arguments is expected to cost a program, from the store:
    chain latency + host time (microseconds) of the variant that would run, or of the
    built-in as last timed at this exact shape on this device; None when nothing was timed."""
    op, call = binding(op_name, args, kwargs)
    if isinstance(call, str):
        return None
    c = choose(op.name, call)
    if c.variant is not None:
        return 1e3 * select.end_to_end_ms(c.record["timing"])
    be = backend()
    return select.builtin_us(op.name, call, device_slug(), be)


def decisions() -> dict:
    """{(op, shape, dtype): what runs and why} for every call decided so far."""
    return {(op, "x".join(str(v) for _, v in shape), dtype): str(c) for (op, shape, dtype), c in _choices.items()}


def decided_calls() -> list[tuple]:
    """(op, shape, dtype) of every call decided so far, in the order first made: what a
    program needs tuned (`hlh_mlx tune` records a model's calls this way)."""
    return [(op, dict(shape), dtype) for op, shape, dtype in _choices]


def fallbacks() -> dict:
    """{(op, reason): count} of decisions to run the built-in: a distinct call (signature)
    counts once, when it first runs, however often it runs after (its plan is then the
    built-in itself, at no cost over it); a call that cannot be remembered (an unhashable
    argument, a trace of a user's compiled function on the emulator) counts every time it
    is decided (on Metal/CUDA, where an op's calls are traced, once per trace); an
    op no stored variant serves at any shape counts its first call only (every later call
    goes to the built-in with no signature, so none is decided or counted), except inside
    `recording` and `lenient` blocks, where every distinct call is.
    Since `refresh()`, which forgets the decisions and the counts."""
    return dict(_fallbacks)


def refresh() -> None:
    """Forget plans, choices, kernels, settings and fallback counts (after a sweep in this
    process, or a change of HLH_MLX_* settings)."""
    config.reset()
    select.refresh()
    _fallbacks.clear()
    generation[0] += 1
    _end_direct()
    for d in _dispatches:
        d.plans.clear()
        d.fallbacks.clear()
        d.counted.clear()
        d._traced, d._untraced = None, False
    _kernels.clear()
    _backend[0] = _slug[0] = None
    _choices.clear()


config.on_reset(_settings_reset)
