"""Backends: turn a variant into a callable kernel, and say which device we are on.

- metal: `mx.fast.metal_kernel` on an Apple GPU (Metal templates).
- emulator: the CPU emulator with the same semantics (Metal templates), for correctness only.
- cuda: `mx.fast.cuda_kernel` on an NVIDIA GPU (CUDA templates).
"""

from __future__ import annotations

import math
import platform
import re
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from .cuda_source import mlx_text
from .emulator import has_metal
from .ops.spec import DTYPES
from .templates import TemplateError
from .variants import Variant

BACKENDS = ("metal", "emulator", "cuda")
TEMPLATE_BACKEND = {"metal": "metal", "emulator": "metal", "cuda": "cuda"}
RUNS_ON = {"metal": "--backend metal (on a Mac) or --backend emulator", "cuda": "--backend cuda (on an NVIDIA GPU)"}


def wrong_backend(template_name: str, template_backend: str, backend: str) -> str:
    """Why a template of one kind cannot run on this back end, and what runs it."""
    return f"{template_name} is a {template_backend} template: it runs with {RUNS_ON[template_backend]}, not on {backend}"


# Back ends whose custom kernels are graph nodes `mx.compile` can trace and replay (the
# emulator computes eagerly on the host, so a trace of it would be a constant).
COMPILABLE = frozenset({"metal", "cuda"})
# Back ends whose checks run every kernel twice and require the same bits (check.check):
# a GPU's threads race; the emulator runs them in one order (its sanitizer finds races).
CHECKED_TWICE = frozenset({"metal", "cuda"})


def has_cuda() -> bool:
    return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())


def auto() -> str:
    """metal on a Mac, cuda with an NVIDIA GPU, else the emulator."""
    return "metal" if has_metal() else "cuda" if has_cuda() else "emulator"


def resolve(name: str) -> str:
    if name == "auto":
        return auto()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (one of auto, {', '.join(BACKENDS)})")
    if name == "metal" and not has_metal():
        raise ValueError("backend 'metal' needs an Apple GPU; off a Mac use --backend emulator")
    if name == "cuda" and not has_cuda():
        raise ValueError("backend 'cuda' needs MLX's CUDA back end (pip install 'hlh-mlx[cuda]') and an NVIDIA GPU")
    return name


@dataclass(frozen=True)
class Device:
    slug: str          # results folder name: variants/<slug>/
    name: str
    architecture: str
    backend: str

    @property
    def can_time(self) -> bool:
        return self.backend != "emulator"


@lru_cache(maxsize=None)
def device(backend: str) -> Device:
    if backend == "emulator":
        return Device("emulator", f"CPU emulator ({platform.machine()})", "emulator", backend)
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    name = str(info.get("device_name") or info.get("name") or backend)
    arch = str(info.get("architecture") or name)
    slug = re.sub(r"[^a-z0-9]+", "-", (arch if backend == "metal" else name).lower()).strip("-")
    return Device(slug, name, arch, backend)


class Kernel:
    """A compiled variant: call it with the op's inputs for one shape."""

    def __init__(self, variant: Variant, backend: str, *, sanitize: bool | None = None):
        """`sanitize`: emulator only (None: the HLH_MLX_SANITIZE environment variable)."""
        t = variant.template
        if TEMPLATE_BACKEND[backend] != t.backend:
            raise ValueError(f"{t.path}: a {t.backend} template cannot run on the {backend} backend")
        self.variant, self.backend = variant, backend
        self._launch: dict = {}  # (shape, dtype) -> (grid, template args): Jinja evaluated once
        r = variant.rendered
        name = f"hlh_{t.op}_{t.family}_{variant.id}"
        if backend == "cuda":
            source, header = mlx_text(r)  # MLX re-hashes the whole source at every evaluation
            self._kernel = mx.fast.cuda_kernel(name=name, input_names=t.inputs, output_names=t.outputs,
                                               source=source, header=header,
                                               shared_memory=variant.shared_memory())
        elif backend == "metal":
            self._kernel = mx.fast.metal_kernel(name=name, input_names=t.inputs, output_names=t.outputs,
                                                source=r.source, header=r.header)
        else:
            from . import emulator
            self._kernel = emulator.metal_kernel(name=name, input_names=t.inputs, output_names=t.outputs,
                                                 source=r.source, header=r.header, sanitize=sanitize)

    def __call__(self, inputs, shape: dict, dtype: str, output_shapes, output_dtypes, init_value=None):
        v = self.variant
        key = (tuple(shape.items()), dtype)
        if key not in self._launch:
            self._launch[key] = (v.grid(shape, dtype), v.template_args(shape, dtype), v.threadgroup())
        grid, targs, tg = self._launch[key]
        return self._kernel(
            inputs=inputs, template=targs, grid=grid, threadgroup=tg, output_shapes=output_shapes,
            output_dtypes=[DTYPES[d] if isinstance(d, str) else d for d in output_dtypes], init_value=init_value)

    def launcher(self, shape: dict, dtype: str, output_shapes, output_dtypes):
        """`f(*inputs) -> outputs` for one shape and dtype, every launch argument worked out
        once: the hot path of a tuned call is this one raw kernel call."""
        v = self.variant
        kwargs = dict(template=v.template_args(shape, dtype), grid=v.grid(shape, dtype), threadgroup=v.threadgroup(),
                      output_shapes=[tuple(s) for s in output_shapes],
                      output_dtypes=[DTYPES[d] if isinstance(d, str) else d for d in output_dtypes])
        raw = self._kernel

        def launch(*inputs):
            return raw(inputs=list(inputs), **kwargs)
        return launch


def poison_value(dtype) -> float | None:
    """init_value that makes unwritten outputs visible: NaN for floats."""
    return math.nan if dtype in (mx.float32, mx.float16, mx.bfloat16) else None


def map_compile_error(err: Exception, variant: Variant) -> str:
    """An emulator compile error or sanitizer finding, with the template file and line it came from."""
    from .emulator import KernelCompileError, SanitizerError
    if isinstance(err, KernelCompileError) and err.line:
        tline = variant.rendered.template_line(err.where, err.line)
        if tline:
            return f"{variant.template.path}:{tline}: {err.message} (kernel {err.where} line {err.line})"
    if isinstance(err, SanitizerError) and err.line and err.where in ("source", "header"):
        tline = variant.rendered.template_line(err.where, err.line)
        if tline:
            who = "; ".join(f"thread {tuple(t['thread_position_in_grid'])}" for t in err.threads)
            return (f"{variant.template.path}:{tline}: {err.kind}: {err.what} (kernel {err.where} line {err.line}"
                    + (f"; {who}" if who else "") + ")")
    if isinstance(err, TemplateError):
        return str(err)
    return str(err).splitlines()[0] if str(err) else type(err).__name__
