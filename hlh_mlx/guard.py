"""Anti-cheat checks for templates and for exported or submitted kernel files.

Templates: every sampled variant must render to a body with no host escape, and must
compute the op with every output written (a run on the emulator with poisoned outputs
and fresh random inputs; CUDA templates need an NVIDIA GPU for that run, and the guard
says so rather than passing them).

Python files (exports, competition submissions): the known ways a "fast kernel" cheats
a benchmark, each reported with its line:
- patching timers or synchronisation (time.perf_counter = ..., mx.synchronize = ...);
- caching results by array identity (id(x), data pointers, lru_cache on the kernel);
- hard-coded benchmark shapes (x.shape == (4096, 4096));
- falling back to the MLX built-in inside an `except`;
- work on other streams than the one being timed (mx.new_stream, stream=...).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

TIMED_MODULES = {"time", "mlx", "mlx.core", "torch", "torch.cuda", "timeit"}
ID_TRICKS = {"data_ptr", "__array_interface__", "unsafe_buffer_pointer", "buffer_info", "addressof"}
CACHE_DECORATORS = {"lru_cache", "cache", "cached_property"}


@dataclass
class Finding:
    path: str
    line: int | None
    kind: str
    message: str
    blocking: bool = True

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.kind}: {self.message}"


class _Scan(ast.NodeVisitor):
    def __init__(self, path: str):
        self.path = path
        self.findings: list[Finding] = []
        self.aliases: dict[str, str] = {}   # local name -> module it names
        self.mlx_names: set[str] = set()    # names imported from mlx.core
        self.in_except = 0

    def add(self, node, kind, message):
        self.findings.append(Finding(self.path, getattr(node, "lineno", None), kind, message))

    # imports: know what `mx`, `t`, `perf_counter` refer to
    def visit_Import(self, node):
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        for a in node.names:
            full = f"{node.module}.{a.name}"
            self.aliases[a.asname or a.name] = full
            if node.module in ("mlx.core", "mlx"):
                self.mlx_names.add(a.asname or a.name)
        self.generic_visit(node)

    def _root_module(self, expr) -> str | None:
        """The module an attribute chain starts from (mx.fast.x -> mlx.core)."""
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            return self.aliases.get(expr.id, None)
        return None

    def _is_mlx(self, func) -> bool:
        root = self._root_module(func) if isinstance(func, ast.Attribute) else self.aliases.get(getattr(func, "id", ""))
        return bool(root and root.startswith("mlx")) or (isinstance(func, ast.Name) and func.id in self.mlx_names)

    def _check_target(self, target, node):
        root = self._root_module(target) if isinstance(target, ast.Attribute) else None
        if root and (root in TIMED_MODULES or root.split(".")[0] in TIMED_MODULES):
            self.add(node, "patched-timer", f"assigns to {ast.unparse(target)}: timers and synchronisation "
                                            "must stay the real ones")

    def visit_Assign(self, node):
        for t in node.targets:
            self._check_target(t, node)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._check_target(node.target, node)
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name == "setattr" and node.args and isinstance(node.args[0], ast.Name) and \
                (self.aliases.get(node.args[0].id, "").split(".")[0] in {m.split(".")[0] for m in TIMED_MODULES}):
            self.add(node, "patched-timer", f"setattr on module {node.args[0].id}")
        if name == "id" and isinstance(f, ast.Name):
            self.add(node, "identity-cache", "id(...) of an array: results keyed by identity replay old answers")
        if name in ID_TRICKS:
            self.add(node, "identity-cache", f"{name}: results keyed by a data pointer replay old answers")
        if name in ("new_stream", "stream") and self._is_mlx(f):
            self.add(node, "stream", f"{ast.unparse(f)}: work on another stream escapes the timed one")
        if any(k.arg == "stream" for k in node.keywords):
            self.add(node, "stream", f"{ast.unparse(f)}(..., stream=...): work on another stream escapes the timed one")
        if self.in_except and self._is_mlx(f) and name not in ("eval", "array", "synchronize"):
            self.add(node, "builtin-fallback", f"calls {ast.unparse(f)} inside `except`: a kernel that fails "
                                               "must fail, not quietly run the built-in")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in ID_TRICKS and not isinstance(getattr(node, "ctx", None), ast.Store):
            if node.attr == "__array_interface__":
                self.add(node, "identity-cache", "__array_interface__: reads the data pointer")
        self.generic_visit(node)

    def visit_ExceptHandler(self, node):
        self.in_except += 1
        self.generic_visit(node)
        self.in_except -= 1

    def _decorators(self, node):
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in CACHE_DECORATORS:
                self.add(d, "identity-cache", f"@{name} on {node.name}: a kernel must compute on every call")

    def visit_FunctionDef(self, node):
        self._decorators(node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Compare(self, node):
        sides = [node.left, *node.comparators]
        if any(_mentions_shape(s) for s in sides) and any(_big_literal(s) for s in sides):
            self.add(node, "hard-coded-shape", f"{ast.unparse(node)}: special-casing a benchmark shape")
        self.generic_visit(node)


def _mentions_shape(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "shape" for n in ast.walk(node))


def _big_literal(node) -> bool:
    """An int literal (or a tuple of them) big enough to be a benchmark size."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value >= 64
    if isinstance(node, (ast.Tuple, ast.List)):
        return any(_big_literal(e) for e in node.elts)
    return False


def scan_python(path: Path) -> list[Finding]:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        return [Finding(str(path), e.lineno, "syntax", str(e.msg))]
    s = _Scan(str(path))
    s.visit(tree)
    return sorted(s.findings, key=lambda f: f.line or 0)


def scan_template(path: Path, sample: int = 2) -> list[Finding]:
    """Render a sample of variants; refuse host escapes; run Metal ones with poisoned outputs."""
    return [f for job in _template_jobs(path, sample) for f in job()]


def _template_jobs(path: Path, sample: int = 2) -> list:
    """The checks of one template, one job per sampled variant (a job returns findings)."""
    from . import templates, variants
    from .templates import TemplateError

    try:
        t = templates.load(path)
        vs = variants.sample(variants.expand(t), sample, seed=0)
    except TemplateError as e:
        return [lambda e=e: [Finding(str(path), e.line, "template", e.message)]]
    except ValueError as e:
        return [lambda e=e: [Finding(str(path), None, "template", str(e))]]
    if not vs:
        return [lambda: [Finding(str(path), None, "template", "the space has no valid variant")]]
    # buffer names go into generated kernel code (and the emulator's launcher spec) as they are
    bad = [n for n in [*t.inputs, *t.outputs] if not (isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n))]
    if bad:
        return [lambda: [Finding(str(path), None, "host-escape", "input/output names must be C identifiers: "
                                 + ", ".join(ascii(n) for n in bad))]]
    return [lambda v=v: _check_variant(path, t, v) for v in vs]


def _check_variant(path: Path, t, v) -> list[Finding]:
    import numpy as np

    from . import backends, check, ops
    from .emulator import safety
    from .emulator.errors import UnsafeKernelError
    from .templates import TemplateError

    out = []
    op = ops.get(t.op)
    rng = np.random.default_rng()
    try:
        r = v.rendered
    except TemplateError as e:  # a failure of this variant: a finding, and the scan goes on
        return [Finding(str(path), e.line, "template", e.message)]
    try:
        if t.backend == "metal":  # the kernel then runs only inside the emulator's sandbox
            for part, text in (("header", r.header), ("source", r.source)):
                safety.prepare(v.label(), part, text)
                safety.check(v.label(), part, text)
        else:
            safety.check_cuda(v.label(), r.header + "\n" + r.source)
    except UnsafeKernelError as e:
        return [Finding(str(path), None, "host-escape", str(e))]
    if t.backend != "metal":
        if not backends.has_cuda():
            return [Finding(str(path), None, "not-run", f"{v.label()}: needs an NVIDIA GPU to prove it writes "
                                                        "every output (run `hlh_mlx check` there)", False)]
    be = "cuda" if t.backend == "cuda" else ("metal" if backends.has_metal() else "emulator")
    dtype = (t.dtypes or ["float32"])[0]
    try:
        k = backends.Kernel(v, be, sanitize=True)
        _, failure = check.check_shapes(k, op, v, op.edge_shapes, dtype, rng)
        if failure:
            out.append(Finding(str(path), None, "wrong-or-unwritten", f"{v.label()} at {failure}"))
    except Exception as e:
        out.append(Finding(str(path), None, "fails", f"{v.label()}: {backends.map_compile_error(e, v)}"))
    return out


def plan(paths: list[Path]) -> list:
    """What `scan` will do, as jobs (each returns its findings): one per Python file and
    one per sampled template variant, in scan order, so a caller can count them."""
    jobs = []
    for p in paths:
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".py":
                jobs.append(lambda f=f: scan_python(f))
            elif f.name.endswith(".j2"):
                jobs += _template_jobs(f)
    return jobs


def scan(paths: list[Path], progress=None) -> list[Finding]:
    """Every finding in `paths`; `progress()` is called after each job of `plan(paths)`."""
    return run(plan(paths), progress)


def run(jobs: list, progress=None) -> list[Finding]:
    findings = []
    for job in jobs:
        findings += job()
        if progress is not None:
            progress()
    return findings
