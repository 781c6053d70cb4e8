"""From a template's parameter space to concrete, valid variants.

A variant is a template with every parameter fixed; its id hashes the template, the
parameters and the rendered source, so results, caches and exports agree on it.
Validity has two layers: the template's own [constraints] (parameters only), and the
backend's limits (threads per threadgroup, threadgroup memory), checked here so no
variant is generated that the GPU would refuse.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from functools import cached_property

from .templates import Rendered, Template, TemplateError

MAX_THREADS = 1024                      # Metal and CUDA: threads per threadgroup/block
THREADGROUP_MEMORY = {"metal": 32768,   # Metal: 32 KB of threadgroup memory
                      "cuda": 49152}    # CUDA: 48 KB of static shared memory per block
# CUDA: static + dynamic shared memory per block on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
CUDA_SHARED_MEMORY_OPTIN = 232448
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
SIMD_WIDTH = 32


@dataclass(frozen=True)
class Variant:
    template: Template
    params: tuple  # ((name, value), ...) in the template's order

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    @cached_property
    def rendered(self) -> Rendered:
        return self.template.render(self.param_dict)

    @cached_property
    def id(self) -> str:
        h = hashlib.sha256()
        h.update(self.template.relpath.encode())
        h.update(json.dumps(self.params).encode())
        h.update(self.rendered.header.encode() + b"\0" + self.rendered.source.encode())
        return h.hexdigest()[:12]

    @property
    def source_hash(self) -> str:
        r = self.rendered
        return hashlib.sha256((r.header + "\0" + r.source).encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.template.family}[{','.join(f'{k}={v}' for k, v in self.params)}]"

    def values(self, shape: dict, dtype: str) -> dict:
        from .ops.spec import DTYPES
        return {**self.param_dict, **shape, "dtype": dtype, "dtype_size": DTYPES[dtype].size,
                "backend": self.template.backend}

    def threadgroup(self) -> tuple[int, int, int]:
        """Threads per threadgroup: depends on parameters only (checked at expansion)."""
        return tuple(int(e(**self.param_dict)) for e in self.template.threadgroup)

    def grid(self, shape: dict, dtype: str) -> tuple[int, int, int]:
        v = self.values(shape, dtype)
        return tuple(int(e(**v)) for e in self.template.grid)

    def shared_memory(self) -> int:
        """CUDA dynamic shared memory to request, in bytes: the most any of the template's
        dtypes needs (MLX sets it once per compiled kernel, not per call)."""
        return _worst_bytes(self.template, self.template.shared_memory, self.param_dict)

    def template_args(self, shape: dict, dtype: str) -> list:
        """MLX template arguments: dtype names become MLX dtypes; expressions may use
        shape variables that select code paths (e.g. rope's TRAD, attention's D)."""
        from .ops.spec import DTYPES
        out = []
        for name, e in self.template.template_args.items():
            val = e(**self.values(shape, dtype))
            out.append((name, DTYPES[val] if isinstance(val, str) and val in DTYPES else val))
        return out

    def supports(self, shape: dict, dtype: str) -> bool:
        t = self.template
        if t.dtypes is not None and dtype not in t.dtypes:
            return False
        v = self.values(shape, dtype)
        return all(bool(e(**v)) for e in t.requires.values())


class SpaceError(ValueError):
    pass


def check_params(template: Template, params: dict) -> None:
    """Every parameter given, known, and inside the template's space."""
    unknown = set(params) - set(template.params)
    if unknown:
        raise SpaceError(f"{template.path}: unknown parameter(s) {', '.join(sorted(unknown))} "
                         f"(the space has {', '.join(template.params) or 'none'})")
    for k, v in params.items():
        if v not in template.params[k]:
            raise SpaceError(f"{template.path}: {k}={v} is outside the space ({k} in {template.params[k]})")
    missing = set(template.params) - set(params)
    if missing:
        raise SpaceError(f"{template.path}: missing parameter(s) {', '.join(sorted(missing))}")


def why_invalid(template: Template, params: dict) -> str | None:
    """None if the parameters make a valid variant, else the reason."""
    for name, e in template.constraints.items():
        if not e(**params):
            return f"constraint {name!r} ({e.text}) fails"
    try:
        tg = [int(e(**params)) for e in template.threadgroup]
    except TemplateError as err:
        raise TemplateError(err.path, err.line, f"{err} (threadgroup may use parameters only)") from None
    threads = tg[0] * tg[1] * tg[2]
    if min(tg) < 1:
        return f"threadgroup {tg} has an empty dimension"
    if threads > MAX_THREADS:
        return f"{threads} threads per threadgroup exceed {MAX_THREADS}"
    static = _worst_bytes(template, template.threadgroup_memory, params)
    limit = THREADGROUP_MEMORY[template.backend]
    if static > limit:
        return f"{static} bytes of threadgroup memory exceed {limit}"
    dynamic = _worst_bytes(template, template.shared_memory, params)
    if static + dynamic > CUDA_SHARED_MEMORY_OPTIN:
        return f"{static} + {dynamic} bytes of shared memory exceed {CUDA_SHARED_MEMORY_OPTIN} per block"
    return None


def _worst_bytes(template: Template, e, params: dict) -> int:
    """A memory expression's largest value over the template's dtypes (0 if absent)."""
    if e is None:
        return 0
    return max(int(e(**params, dtype=d, dtype_size=DTYPE_SIZES[d])) for d in (template.dtypes or DTYPE_SIZES))


def make(template: Template, params: dict) -> Variant:
    """The variant for explicit parameters, or a SpaceError saying why not."""
    check_params(template, params)
    reason = why_invalid(template, params)
    if reason:
        raise SpaceError(f"{template.path}: {params} is not a valid variant: {reason}")
    return Variant(template, tuple((k, params[k]) for k in template.params))


def expand(template: Template) -> list[Variant]:
    """Every valid variant of the template's space, in a stable order."""
    names = list(template.params)
    out = []
    for combo in itertools.product(*(template.params[n] for n in names)):
        params = dict(zip(names, combo))
        if why_invalid(template, params) is None:
            out.append(Variant(template, tuple(params.items())))
    return out


def sample(variants: list[Variant], budget: int | None, seed: int = 0) -> list[Variant]:
    """A reproducible sample of at most `budget` variants (all of them if None)."""
    if budget is None or budget >= len(variants):
        return list(variants)
    rng = random.Random(seed)
    return sorted(rng.sample(variants, budget), key=variants.index)


def neighbours(best: Variant, pool: list[Variant]) -> list[Variant]:
    """Variants of the same template differing from `best` in one parameter by one step."""
    t = best.template
    p = best.param_dict
    out = []
    for v in pool:
        if v.template is not t or v is best:
            continue
        q = v.param_dict
        diff = [k for k in p if p[k] != q[k]]
        if len(diff) == 1:
            k = diff[0]
            values = t.params[k]
            if abs(values.index(p[k]) - values.index(q[k])) == 1:
                out.append(v)
    return out
