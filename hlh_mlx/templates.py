"""Kernel templates: one file per kernel family, self-describing.

A template is `templates/<op>/<family>.<backend>.j2`: a leading Jinja comment holding
TOML (what the kernel is, its parameter space, constraints, launch geometry), then the
Jinja2 body of the kernel. An optional `{% set header %}...{% endset %}` block gives
helper code placed before the kernel function.

    {#
    [meta]
    op = "matmul"
    inputs = ["a", "b"]
    outputs = ["c"]
    summary = "one thread per output element"
    [params]
    TX = [8, 16, 32]
    [constraints]
    square = "TX * TX <= 1024"
    [launch]
    grid = ["ceil_div(N, TX) * TX", "ceil_div(M, TX) * TX", "1"]
    threadgroup = ["TX", "TX", "1"]
    [template_args]
    T = "dtype"
    #}
    uint row = thread_position_in_grid.y; ...

Expressions are Jinja expressions evaluated in a sandboxed environment (no Python
eval): they see the parameters, the op's shape variables (M, N, K, ...), `dtype`,
`dtype_size` and `backend`, and the helpers ceil_div, min and max. Every error names
the template file and line.
"""

from __future__ import annotations

import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from . import paths

BACKENDS = ("metal", "cuda")
_HEADER = re.compile(r"\A\s*\{#(.*?)#\}", re.S)
_MARK = "\x01"
_MARKED = re.compile(r"\x01(\d+)\x01")


class TemplateError(ValueError):
    """A template that cannot be used: names the file and line."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


# Rendering is bounded: a template from outside must not hang a sweep or eat memory.
MAX_RANGE = 100_000            # items one range() may yield
MAX_RENDER_STEPS = 1_000_000   # loop steps and calls in one render
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_CHARS = 4_000_000   # rendered text, and any string or sequence built on the way


class RenderLimit(RuntimeError):
    """A render went over one of the bounds above."""


class _Budget(threading.local):
    deadline: float | None = None
    steps: int = 0

    def tick(self) -> None:
        if self.deadline is None:
            return
        self.steps += 1
        if self.steps > MAX_RENDER_STEPS:
            raise RenderLimit(f"more than {MAX_RENDER_STEPS} loop steps and calls")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise RenderLimit(f"took longer than {MAX_RENDER_SECONDS:g} s")


_BUDGET = _Budget()


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise RenderLimit(f"range of {len(r)} items (at most {MAX_RANGE})")

    def steps():
        for i in r:
            _BUDGET.tick()
            yield i
    return steps()


class _BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, with every call, loop step and product of sizes on a budget."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _BUDGET.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 256:
            raise RenderLimit(f"{left} ** {right} is too large")
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                and len(left) * right > MAX_RENDER_CHARS:
            raise RenderLimit("a sequence repeated past the render size limit")
        if operator == "*" and isinstance(right, (str, list, tuple)) and isinstance(left, int) \
                and len(right) * left > MAX_RENDER_CHARS:
            raise RenderLimit("a sequence repeated past the render size limit")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (str, list, tuple)) and len(result) > MAX_RENDER_CHARS:
            raise RenderLimit("a value past the render size limit")
        return result


def _env() -> SandboxedEnvironment:
    env = _BoundedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)
    env.globals.update(ceil_div=lambda a, b: -(-a // b), min=min, max=max, range=_range)
    return env


def _template_line(tb, nlines: int) -> int | None:
    """The template line a render error was raised at (Jinja maps its frames to it)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>" and 0 < tb.tb_lineno <= nlines:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


ENV = _env()


@dataclass(frozen=True)
class Expr:
    """A Jinja expression from a template header, with where it came from."""
    text: str
    path: str
    line: int

    @cached_property
    def _compiled(self):
        try:
            return ENV.compile_expression(str(self.text), undefined_to_none=False)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(self.path, self.line, f"bad expression {self.text!r}: {e.message}") from None

    def __call__(self, **values):
        try:
            return self._compiled(**values)
        except jinja2.UndefinedError as e:
            raise TemplateError(self.path, self.line, f"in {self.text!r}: {e.message}") from None
        except (TypeError, ValueError, ZeroDivisionError, jinja2.exceptions.SecurityError) as e:
            raise TemplateError(self.path, self.line, f"in {self.text!r}: {e}") from None


@dataclass(frozen=True)
class Rendered:
    """A rendered kernel body and header, with each body line's template line."""
    source: str
    header: str
    source_lines: tuple[int, ...]
    header_lines: tuple[int, ...]

    def template_line(self, part: str, line: int) -> int | None:
        lines = self.source_lines if part == "source" else self.header_lines
        return lines[line - 1] if 0 < line <= len(lines) else None


@dataclass
class Template:
    path: Path
    op: str
    family: str
    backend: str
    inputs: list[str]
    outputs: list[str]
    summary: str
    expect: str
    params: dict[str, list]
    constraints: dict[str, Expr]
    requires: dict[str, Expr]
    grid: tuple[Expr, Expr, Expr]
    threadgroup: tuple[Expr, Expr, Expr]
    threadgroup_memory: Expr | None
    shared_memory: Expr | None  # CUDA: dynamic shared memory bytes (mx.fast.cuda_kernel shared_memory=)
    template_args: dict[str, Expr]
    dtypes: list[str] | None
    text: str = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.family}.{self.backend}"

    @property
    def relpath(self) -> str:
        return f"{self.op}/{self.path.name}"

    @cached_property
    def _jinja(self) -> jinja2.Template:
        try:
            return ENV.from_string(_mark_lines(self.text))
        except jinja2.TemplateSyntaxError as e:
            line = e.lineno or self.text.count("\n") + 1
            raise TemplateError(self.path, line, f"template syntax error: {e.message}") from None

    def render(self, params: dict) -> Rendered:
        compiled = self._jinja
        _BUDGET.deadline, _BUDGET.steps = time.monotonic() + MAX_RENDER_SECONDS, 0
        nlines = self.text.count("\n") + 1
        try:
            module = compiled.make_module(dict(params))
            body = str(module)
            header = str(getattr(module, "header", "") or "")
            if len(body) + len(header) > MAX_RENDER_CHARS:
                raise RenderLimit(f"rendered {len(body) + len(header)} characters (at most {MAX_RENDER_CHARS})")
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None) or _template_line(e.__traceback__, nlines)
            raise TemplateError(self.path, line, f"rendering with {params}: {e}") from None
        except RenderLimit as e:
            raise TemplateError(self.path, _template_line(e.__traceback__, nlines),
                                f"rendering with {params} was stopped: {e}") from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, MemoryError, RecursionError) as e:
            raise TemplateError(self.path, _template_line(e.__traceback__, nlines), f"rendering with {params}: {e}") from None
        finally:
            _BUDGET.deadline = None
        source, src_lines = _unmark(body)
        header, hdr_lines = _unmark(header)
        # MLX pastes the header right before the kernel's own text: end it with a newline
        return Rendered(source, header + "\n" if header else "", src_lines, hdr_lines)


def _mark_lines(text: str) -> str:
    """Tag the end of each template line (outside Jinja tags) with its line number."""
    out, depth = [], None
    for number, line in enumerate(text.split("\n"), 1):
        i = 0
        while i < len(line):
            two = line[i:i + 2]
            if depth is None and two in ("{%", "{{", "{#"):
                depth = {"{%": "%}", "{{": "}}", "{#": "#}"}[two]
                i += 2
            elif depth is not None and two == depth:
                depth = None
                i += 2
            else:
                i += 1
        out.append(line + (f"{_MARK}{number}{_MARK}" if depth is None else ""))
    return "\n".join(out)


def _unmark(text: str) -> tuple[str, tuple[int, ...]]:
    """Strip line tags and lines left empty (statement lines); map each kept line to
    the template line it came from (a line without a tag takes the next tag's line)."""
    out: list[str] = []
    numbers: list[int | None] = []
    for line in text.split("\n"):
        tags = _MARKED.findall(line)
        clean = _MARKED.sub("", line)
        if clean.strip():
            out.append(clean)
            numbers.append(None)
        if tags:
            for i in range(len(numbers) - 1, -1, -1):
                if numbers[i] is not None:
                    break
                numbers[i] = int(tags[0])
    last = next((n for n in reversed(numbers) if n is not None), 0)
    return "\n".join(out), tuple(n if n is not None else last for n in numbers)


def _line_of(text: str, offset: int, key: str, section: str) -> int:
    """Line (in the file) where `key` is set inside [section] of the header."""
    m = re.search(rf"^\[{re.escape(section)}\]", text[offset:], re.M)
    start = offset + (m.end() if m else 0)
    k = re.search(rf"^\s*{re.escape(key)}\s*=", text[start:], re.M)
    return text.count("\n", 0, start + (k.start() if k else 0)) + 1 + (1 if k and text[start + k.start()] == "\n" else 0)


def load(path: Path | str) -> Template:
    """Parse a template file (errors name the file and line)."""
    path = Path(path)
    text = path.read_text()
    m = _HEADER.match(text)
    if not m:
        raise TemplateError(path, 1, "missing the leading {# ... #} header (TOML: [meta], [params], [launch])")
    head_line = text.count("\n", 0, m.start(1)) + 1
    try:
        meta = tomllib.loads(m.group(1))
    except tomllib.TOMLDecodeError as e:
        ln = re.search(r"line (\d+)", str(e))
        raise TemplateError(path, head_line + int(ln.group(1)) - 1 if ln else head_line,
                            f"bad TOML header: {e}") from None
    stem = path.name.removesuffix(".j2")
    if stem.count(".") != 1:
        raise TemplateError(path, None, "name must be <family>.<backend>.j2")
    family, backend = stem.split(".")
    if backend not in BACKENDS:
        raise TemplateError(path, None, f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    hdr_off = m.start(1)

    def expr(section, key, value) -> Expr:
        if not isinstance(value, (str, int, float)):
            raise TemplateError(path, _line_of(text, hdr_off, key, section), f"[{section}] {key} must be an expression")
        return Expr(str(value), str(path), _line_of(text, hdr_off, key, section))

    def need(section, key):
        try:
            return meta[section][key]
        except KeyError:
            raise TemplateError(path, head_line, f"header lacks [{section}] {key}") from None

    info = meta.get("meta", {})
    op = need("meta", "op")
    if op != path.parent.name:
        raise TemplateError(path, _line_of(text, hdr_off, "op", "meta"),
                            f"[meta] op = {op!r} but the file is in templates/{path.parent.name}/")
    params = meta.get("params", {})
    for k, v in params.items():
        if not isinstance(v, list) or not v:
            raise TemplateError(path, _line_of(text, hdr_off, k, "params"), f"[params] {k} must be a non-empty list")
    launch = meta.get("launch", {})
    grid, tg = need("launch", "grid"), need("launch", "threadgroup")
    for key, v in (("grid", grid), ("threadgroup", tg)):
        if not isinstance(v, list) or len(v) != 3:
            raise TemplateError(path, _line_of(text, hdr_off, key, "launch"), f"[launch] {key} must list 3 expressions")
    if "shared_memory" in launch and backend != "cuda":
        raise TemplateError(path, _line_of(text, hdr_off, "shared_memory", "launch"),
                            "[launch] shared_memory (dynamic shared memory) is for CUDA templates; "
                            "Metal templates declare threadgroup memory in the body")
    template = Template(
        path=path, op=op, family=family, backend=backend,
        inputs=list(need("meta", "inputs")), outputs=list(need("meta", "outputs")),
        summary=info.get("summary", ""), expect=info.get("expect", ""),
        params=params,
        constraints={k: expr("constraints", k, v) for k, v in meta.get("constraints", {}).items()},
        requires={k: expr("requires", k, v) for k, v in meta.get("requires", {}).items()},
        grid=tuple(expr("launch", "grid", v) for v in grid),
        threadgroup=tuple(expr("launch", "threadgroup", v) for v in tg),
        threadgroup_memory=expr("launch", "threadgroup_memory", launch["threadgroup_memory"])
        if "threadgroup_memory" in launch else None,
        shared_memory=expr("launch", "shared_memory", launch["shared_memory"])
        if "shared_memory" in launch else None,
        template_args={k: expr("template_args", k, v) for k, v in meta.get("template_args", {}).items()},
        dtypes=info.get("dtypes"),
        text=text,
    )
    template._jinja  # compile now: a syntax error shows when the template is loaded
    return template


def discover(op: str | None = None) -> list[Template]:
    """Every template shipped (and in $HLH_MLX_TEMPLATES), optionally for one op."""
    found = []
    for root in paths.template_roots():
        for p in sorted(root.glob("*/*.j2")):
            if op is None or p.parent.name == op:
                found.append(load(p))
    return found
