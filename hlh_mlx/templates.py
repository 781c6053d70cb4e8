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

import codecs
import inspect
import itertools
import re
import string
import threading
import time
import types
import tomllib
from collections.abc import ItemsView, KeysView, ValuesView
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2 import pass_context
from jinja2.compiler import CodeGenerator
from jinja2 import runtime as _runtime
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import Namespace, _PassArg

from . import paths

BACKENDS = ("metal", "cuda")
_HEADER = re.compile(r"\A\s*\{#(.*?)#\}", re.S)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MARK = "\x01"
_MARKED = re.compile(r"\x01(\d+)\x01")


class TemplateError(ValueError):
    """A template that cannot be used: names the file and line."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


# Rendering is bounded: a template from outside must not hang a sweep or eat memory.
# Every size is checked *before* the value is built (format widths, padding, repeats,
# joins), and every string or sequence built on the way counts against one allowance,
# so no single operation and no sum of them can fill memory. Header expressions
# (constraints, launch geometry, template args) run under the same budget.
MAX_RANGE = 100_000            # items one range() may yield
MAX_RENDER_STEPS = 1_000_000   # loop steps and calls in one render
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_CHARS = 4_000_000   # rendered text, and any string or sequence built on the way
MAX_RENDER_ALLOC = 16          # all strings and sequences built in one render: this many MAX_RENDER_CHARS
MAX_TEMPLATE_BYTES = 1 << 20  # a template file (Jinja's compiler and the line tagging are not bounded)
MAX_INT_BITS = 1 << 16         # integers (** and *) stay below 2**65536: big-int arithmetic is slow


class RenderLimit(RuntimeError):
    """A render went over one of the bounds above."""


class _Budget(threading.local):
    deadline: float | None = None
    steps: int = 0
    built: int = 0
    sizes: dict | None = None  # id -> (container, bound on its text size), see _check_mutated

    def start(self) -> tuple:
        """Begin a budget (a nested start keeps the outer one); returns what to restore."""
        saved = (self.deadline, self.steps, self.built, self.sizes)
        if self.deadline is None:
            self.deadline, self.steps, self.built, self.sizes = time.monotonic() + MAX_RENDER_SECONDS, 0, 0, {}
        return saved

    def restore(self, saved: tuple) -> None:
        if saved[0] is None:
            self.deadline, self.steps, self.built, self.sizes = saved

    def tick(self) -> None:
        if self.deadline is None:
            return
        self.steps += 1
        if self.steps > MAX_RENDER_STEPS:
            raise RenderLimit(f"more than {MAX_RENDER_STEPS} loop steps and calls")
        if time.monotonic() > self.deadline:  # every step: one step can be a costly call
            raise RenderLimit(f"took longer than {MAX_RENDER_SECONDS:g} s")

    def spend(self, n: int) -> None:
        """Count `n` characters (or items) built; over the allowance stops the render."""
        if self.deadline is None:
            return
        self.built += n
        if self.built > MAX_RENDER_ALLOC * MAX_RENDER_CHARS:
            raise RenderLimit(f"built more than {MAX_RENDER_ALLOC * MAX_RENDER_CHARS} characters in all")
        if time.monotonic() > self.deadline:
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


def _want(n, what: str = "a value") -> None:
    """Refuse to build something of `n` characters or items past the size limit."""
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_RENDER_CHARS:
        raise RenderLimit(f"{what} past the render size limit ({MAX_RENDER_CHARS})")


_SMALL = frozenset([int, float, bool, type(None)])
_SEQUENCES = (str, bytes, bytearray, list, tuple)


def _size(obj, limit: int | None = None) -> int:
    """About len(str(obj)), counted without building it; stops once past `limit`.
    A container met again counts again (its text is repeated), once measured."""
    cls = obj.__class__
    if cls is str:
        return len(obj) + 3
    if cls in _SMALL:
        return 24 if cls is not int else obj.bit_length() // 3 + 2
    limit = MAX_RENDER_CHARS if limit is None else limit
    measured: dict[int, int | None] = {}  # id -> size; None while inside it (a cycle prints as [...])

    def walk(o, depth: int) -> int:
        if isinstance(o, (str, bytes, bytearray)):
            return len(o) + 3
        if isinstance(o, int):
            return o.bit_length() // 3 + 2
        if isinstance(o, Namespace):  # prints as <Namespace {...}>
            o = o._Namespace__attrs  # type: ignore[attr-defined]
        elif isinstance(o, (KeysView, ValuesView, ItemsView)):  # dict views print every item
            o = tuple(o)
        if not isinstance(o, (list, tuple, set, frozenset, dict)):
            return 32
        key = id(o)
        if key in measured:
            return measured[key] or 5
        if depth > 200:
            return limit + 1
        measured[key] = None
        total = 2 + 2 * len(o)
        for item in itertools.chain(o, o.values()) if isinstance(o, dict) else o:
            if total > limit:
                break
            cls = item.__class__  # the common items inline: a walk is one Python loop
            if cls is int:
                total += item.bit_length() // 3 + 2
            elif cls is str:
                total += len(item) + 3
            elif cls in _SMALL:
                total += 24
            else:
                total += walk(item, depth + 1)
        measured[key] = total
        return total
    return walk(obj, 0)


def _checked(value):
    """A value just built: refuse it past the size limit, and count it."""
    if value.__class__ in _SMALL and (value.__class__ is not int or value.bit_length() <= MAX_INT_BITS):
        return value
    if isinstance(value, (str, bytes, bytearray)):
        _want(len(value))
        _BUDGET.spend(len(value))
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        _want(len(value))
        _want(_size(value), "a nested value")  # shared sub-lists count each time: == and hash walk them all
        _BUDGET.spend(16 * len(value))  # an item costs a pointer and often an object
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise RenderLimit(f"an integer of {value.bit_length()} bits is too large")
    return value


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.")


def _field_width(digits: str) -> int:
    return int(digits) if len(digits) < 12 else MAX_RENDER_CHARS + 1


def _check_percent(fmt, values) -> None:
    """`fmt % values` (and the format filter): widths, precisions and values, before formatting."""
    if isinstance(fmt, (bytes, bytearray)):
        fmt = fmt.decode("latin-1")  # b"%200000000d" % 1 pads the same way
    if not isinstance(fmt, str):
        return
    items = list(values.values()) if isinstance(values, dict) else list(values) if isinstance(values, tuple) else [values]
    total, star = len(fmt), False
    for m in _PERCENT.finditer(fmt):
        for g in m.group(1, 2):
            if g == "*":
                star = True
            elif g:
                total += _field_width(g)
    if star and any(isinstance(v, int) and abs(v) > MAX_RENDER_CHARS for v in items):
        raise RenderLimit("a format width past the render size limit")
    _want(total + sum(_size(v) for v in items), "a formatted string")


def _check_format(fmt: str, args, kwargs) -> None:
    """`fmt.format(...)`: field widths and precisions, and the values, before formatting."""
    values = list(args) + list(kwargs.values())
    total, nested = len(fmt), False
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            nested = nested or "{" in spec
            total += sum(_field_width(d) for d in re.findall(r"\d+", spec))
    if nested and any(isinstance(v, int) and abs(v) > MAX_RENDER_CHARS for v in values):
        raise RenderLimit("a format width past the render size limit")
    _want(total + sum(_size(v) for v in values), "a formatted string")


def _check_replace(s, old, new, count=None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _want(len(s) + n * (len(new) - len(old)), "a replaced string")


def _check_join(sep, items: list) -> None:
    _want(len(sep) * max(len(items) - 1, 0) + sum(_size(i) for i in items), "a joined string")


_CODECS = frozenset(["utf-8", "ascii", "latin-1", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be",
                     "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig", "cp1252"])


def _check_method(obj, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the built-in methods that build a value from a size argument."""
    target = getattr(obj, "__wrapped__", obj)
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if isinstance(target, types.BuiltinFunctionType) and any(callable(a) for a in (*args, *kwargs.values())):
        # C code calling back (x.sort(key=y.append), max(x, key=...)) would skip every check here
        raise RenderLimit(f"{name}() given a function")
    if isinstance(owner, (str, bytes, bytearray)):
        first = args[0] if args else next(iter(kwargs.values()), None)
        if name in ("center", "ljust", "rjust", "zfill"):
            _want(first, f"str.{name} width")
        elif name == "expandtabs":
            _want(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t")
                  * (first if isinstance(first, int) else 8), "str.expandtabs")
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
        elif name == "join" and args:
            items = list(args[0])
            _check_join(owner, items)
            args = (items,) + args[1:]
        elif name in ("format", "format_map") and isinstance(owner, str):
            _check_format(owner, args[0].values() if name == "format_map" and args and isinstance(args[0], dict)
                          else args, kwargs)
        elif name == "translate" and isinstance(first, dict):
            _want(len(owner) * max((_size(v) for v in first.values()), default=1), "str.translate")
    if isinstance(owner, (str, bytes, bytearray)) and name in ("encode", "decode"):
        enc = args[0] if args else kwargs.get("encoding", "utf-8")
        try:
            enc = codecs.lookup(enc).name if isinstance(enc, str) else enc
        except LookupError:
            pass  # the call itself says so
        else:
            if enc not in _CODECS:  # punycode is quadratic: one call on 20k characters takes minutes
                raise RenderLimit(f"{name} with {enc!r} (allowed: {', '.join(sorted(_CODECS))})")
    if isinstance(owner, (list, bytearray)) and name in ("extend", "__iadd__") and args \
            and hasattr(args[0], "__len__"):
        _want(len(owner) + len(args[0]), "a list")
    return args


_GROWERS = frozenset(["append", "insert", "extend", "update", "setdefault", "add"])


def _known_size(value) -> int:
    known = (_BUDGET.sizes or {}).get(id(value))
    return known[1] if known is not None and known[0] is value else _size(value)


def _check_mutated(obj, args: tuple, kwargs: dict) -> None:
    """A list, dict or set that a method just grew: its length, and its text size (what
    ==, `in` and hash() walk: x.append(y) can nest without a literal). The size is kept
    per object as a bound that grows by what each call adds, so appending stays O(1)."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, (list, dict, set, bytearray)):
        return
    _want(len(owner), "a collection")
    if getattr(obj, "__name__", "") not in _GROWERS or isinstance(owner, bytearray):
        return
    known = (_BUDGET.sizes or {}).get(id(owner))
    if known is not None and known[0] is owner:
        bound = known[1] + sum(_known_size(a) + 2 for a in (*args, *kwargs.values()))
    else:
        bound = _size(owner)
    if bound > MAX_RENDER_CHARS:
        bound = _size(owner)  # measure exactly before refusing
    _want(bound, "a nested value")
    if _BUDGET.sizes is not None:
        _BUDGET.sizes[id(owner)] = (owner, bound)  # holds the object: its id is not reused


# filters that turn a value into text: how much longer than the value's own text it may get
_FACTOR = {"string": 1, "pprint": 2, "tojson": 12, "urlencode": 12, "escape": 6, "e": 6, "forceescape": 6,
           "urlize": 12, "xmlattr": 12, "title": 1, "upper": 1, "lower": 1, "capitalize": 1, "trim": 1,
           "striptags": 1, "safe": 1}


def _check_filter(name: str, a: dict) -> None:
    value = a.get("value", a.get("s"))
    if name in _FACTOR:
        _want(_size(value) * _FACTOR[name], f"the {name} filter's result")
    if name == "tojson":  # indent is repeated on every line, once per nesting level
        ind = (a.get("kwargs") or {}).get("indent", a.get("indent"))
        if ind is not None and (len(ind) if isinstance(ind, str) else ind if isinstance(ind, int) else 0) > 16:
            raise RenderLimit("tojson indent over 16")
    elif name == "urlize":  # target and rel are written into every link
        extra = sum(len(v) for v in a.values() if isinstance(v, str) and v is not value)
        _want((_size(value) + 1) * (12 + extra), "the urlize filter's result")
    if name == "center":
        _want(a.get("width", 80), "a center width")
    elif name == "indent" and isinstance(value, str):
        w = a.get("width", 4)
        _want(len(value) + (value.count("\n") + 1) * (len(w) if isinstance(w, str) else w if isinstance(w, int) else 0),
              "an indented string")
    elif name == "wordwrap" and isinstance(value, str):
        if len(value) > 1 << 14:  # textwrap cuts a long word one width at a time: quadratic (1M chars: 20 s)
            raise RenderLimit(f"wordwrap of {len(value)} characters (at most {1 << 14})")
        _want(len(value) + (len(value) + 1) * len(a.get("wrapstring") or "\n"), "a wrapped string")
    elif name == "format":
        kw, args = a.get("kwargs") or {}, a.get("args") or ()
        _check_percent(value, kw or tuple(args))
    elif name == "replace":
        _check_replace(value, a.get("old"), a.get("new"), a.get("count"))
    elif name == "batch":
        _want(a.get("linecount"), "a batch")
    elif name == "slice":
        n = a.get("slices")
        if isinstance(n, int) and n > MAX_RANGE:
            raise RenderLimit(f"slice into {n} parts (at most {MAX_RANGE})")
    elif name == "sum" and not isinstance(a.get("start", 0), (int, float)):
        items = value if isinstance(value, (list, tuple)) else []
        _want(_size(a.get("start")) + _size(items), "a sum")
        if len(items) > 10_000:
            raise RenderLimit("a sum of more than 10000 sequences")


def _bounded(name: str, func, kind: str):
    """A filter or test that ticks the budget and checks sizes before and after.
    It takes the context, so Jinja never runs it at compile time (constant folding)."""
    pass_arg = _PassArg.from_obj(func)
    try:  # bind arguments by the plain function's names (Jinja's async wrappers add an eval_ctx)
        base = inspect.unwrap(func)
        sig = inspect.signature(base, follow_wrapped=False)
        drop = 1 if _PassArg.from_obj(base) is not None else 0
        sig = sig.replace(parameters=list(sig.parameters.values())[drop:])
    except (TypeError, ValueError):
        sig = None

    @pass_context
    def call(context, *args, **kwargs):
        _BUDGET.tick()
        if kind == "filter" and sig is not None:
            try:
                bound = sig.bind(*args, **kwargs).arguments
            except TypeError:
                bound = None
            if bound is not None:
                if name == "join" and "value" in bound:
                    items = list(bound["value"])
                    _check_join(bound.get("d", ""), items if bound.get("attribute") is None else [])
                    args = (items,) + args[1:]
                _check_filter(name, bound)
        if pass_arg is _PassArg.context:
            result = func(context, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, *args, **kwargs)
        else:
            result = func(*args, **kwargs)
        return _checked(result)
    call.__name__ = getattr(func, "__name__", name)
    return call


def _loop_steps(iterable):
    for item in iterable:
        _BUDGET.tick()
        yield item


def _str_join(seq) -> str:
    parts = list(seq)
    _want(sum(_size(p) for p in parts), "a joined string")
    return _checked(_runtime.str_join(parts))


def _markup_join(seq) -> str:
    parts = list(seq)
    _want(sum(_size(p) for p in parts), "a joined string")
    return _checked(_runtime.markup_join(parts))


def _concat(parts) -> str:
    parts = list(parts)
    _want(sum(len(p) for p in parts), "a block")
    return _checked("".join(parts))


class _BoundedTemplate(jinja2.Template):
    @classmethod
    def _from_namespace(cls, environment, namespace, globals):
        # `a ~ b` and block/macro bodies are joined by these names in the compiled code
        namespace["str_join"], namespace["markup_join"] = _str_join, _markup_join
        return super()._from_namespace(environment, namespace, globals)


@pass_context
def _finalize(context, value):
    """Every {{ value }}: its text is counted before it is built."""
    if value.__class__ not in _SMALL and not isinstance(value, str):
        _want(_size(value), "an output value")
    return value


def _literal(value):
    """A [..], (..) or {..} written in the template: it may nest what exists already."""
    _BUDGET.tick()
    _want(_size(value), "a nested value")
    return value


class _BoundedCodeGenerator(CodeGenerator):
    """Literal lists, tuples and dicts go through _literal: `{% set x = [x, x] %}` in a
    loop doubles what == , `in` and hash() walk, at no cost in memory."""

    def _wrapped(self, visit, node, frame) -> None:
        if getattr(node, "ctx", "load") != "load":
            return visit(node, frame)  # a loop or set target
        self.write("environment.literal(")
        visit(node, frame)
        self.write(")")

    def visit_Tuple(self, node, frame) -> None:
        self._wrapped(super().visit_Tuple, node, frame)

    def visit_List(self, node, frame) -> None:
        self._wrapped(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._wrapped(super().visit_Dict, node, frame)


class _BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, with every call, loop step and value built on a budget."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])  # the ones that can build big values
    template_class = _BoundedTemplate
    concat = staticmethod(_concat)

    def _parse(self, source, name, filename):
        # every {% for %} ticks per item, not only over range(): two loops over a list nest
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(jinja2.nodes.For):
            node.iter = jinja2.nodes.Filter(node.iter, "_loop_steps", [], [], None, None, lineno=node.iter.lineno)
        return tree
    literal = staticmethod(_literal)
    code_generator_class = _BoundedCodeGenerator

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _BUDGET.tick()
        args = _check_method(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_mutated(__obj, args, kwargs)
        return _checked(result)

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args, **kwargs):
            _BUDGET.tick()
            _check_format(fmt, args[0].values() if is_map and args and isinstance(args[0], dict) else args, kwargs)
            return _checked(wrapper(*args, **kwargs))
        return checked

    def call_binop(self, context, operator, left, right):
        _BUDGET.tick()
        if left.__class__ is float or right.__class__ is float:  # the common, harmless case
            return self.binop_table[operator](left, right)
        if left.__class__ is int and right.__class__ is int:  # the other common case: sizes of results
            if operator == "**" and abs(left) > 1 and right > 0 \
                    and (right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS):
                raise RenderLimit(f"an integer of {left.bit_length()} bits ** {right} is too large")
            if operator == "*" and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimit("a product of integers is too large")
            return self.binop_table[operator](left, right)
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right > 0 \
                and (right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS):
            raise RenderLimit(f"an integer of {left.bit_length()} bits ** {right} is too large")
        if operator == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise RenderLimit("a product of integers is too large")
        if operator == "*" and isinstance(right, _SEQUENCES) and isinstance(left, int):
            left, right = right, left  # (same product; Python's * is symmetric here)
        if operator == "*" and isinstance(left, _SEQUENCES) and isinstance(right, int) \
                and (len(left) * right > MAX_RENDER_CHARS
                     or isinstance(left, (list, tuple)) and _size(left) * right > MAX_RENDER_CHARS):
            raise RenderLimit("a sequence repeated past the render size limit")
        if operator == "+" and isinstance(left, (str, list, tuple)) and hasattr(right, "__len__"):
            _want(len(left) + len(right), "a sum of sequences")
            if not isinstance(left, str):
                _want(_size(left) + _size(right), "a sum of sequences")
        if operator == "%" and isinstance(left, (str, bytes, bytearray)):
            _check_percent(left, right)
        return _checked(super().call_binop(context, operator, left, right))


def _env() -> SandboxedEnvironment:
    # optimized=False: Jinja's optimizer would run constant filters and operators while
    # compiling, outside every check; _finalize (context-bound) stops constant output folding.
    env = _BoundedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, optimized=False, finalize=_finalize)
    env.globals.pop("lipsum", None)  # one call builds any amount of text
    env.globals.update(ceil_div=lambda a, b: -(-a // b), min=min, max=max, range=_range)
    env.filters = {k: _bounded(k, f, "filter") for k, f in env.filters.items()}
    env.filters["_loop_steps"] = _loop_steps
    env.tests = {k: _bounded(k, f, "test") for k, f in env.tests.items()}
    return env


_UNDEFINED = re.compile(r"'([^']+)' is undefined")


def _undefined_message(e: jinja2.UndefinedError) -> str | None:
    """Jinja's "'X' is undefined" as the toolkit says it: undefined name 'X'."""
    m = _UNDEFINED.fullmatch(str(e.message or ""))
    return f"undefined name {m.group(1)!r}" if m else None


def _undefined_names(tree: jinja2.nodes.Template, known: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each name the body reads that nothing can define: not a parameter,
    not a global, and never assigned anywhere in the template (a name set on one branch
    only is left to the render, which names its line when it is missing). Reads guarded by
    `is defined` or `| default` are fine."""
    from jinja2 import meta, nodes
    loaded = meta.find_undeclared_variables(tree) - known - set(ENV.globals)
    if not loaded:
        return []
    names = list(tree.find_all(nodes.Name))
    assigned = {n.name for n in names if n.ctx != "load"}
    guarded = {id(n.node) for n in tree.find_all((nodes.Test, nodes.Filter))
               if isinstance(n.node, nodes.Name) and n.name in ("defined", "undefined", "default", "d")}
    first: dict[str, int] = {}
    for n in names:
        if n.ctx == "load" and n.name in loaded and n.name not in assigned and id(n) not in guarded:
            first[n.name] = min(first.get(n.name, n.lineno), n.lineno)
    return sorted((line, name) for name, line in first.items())


def _template_line(tb, nlines: int, compiled: jinja2.Template | None = None) -> int | None:
    """The template line a render error was raised at: the innermost frame of the
    compiled template, mapped back through its debug info (code line -> template line)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            n = compiled.get_corresponding_lineno(tb.tb_lineno) if compiled is not None else tb.tb_lineno
            if 0 < n <= nlines:
                line = n
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
        except (RecursionError, MemoryError, ValueError, OverflowError) as e:
            raise TemplateError(self.path, self.line, f"expression cannot be compiled: {type(e).__name__}: {e}") from None

    def __call__(self, **values):
        compiled = self._compiled
        saved = _BUDGET.start()  # a header expression is bounded like a render
        try:
            return compiled(**values)
        except jinja2.UndefinedError as e:
            raise TemplateError(self.path, self.line, f"{_undefined_message(e) or e.message} in {self.text!r}") from None
        except RenderLimit as e:
            raise TemplateError(self.path, self.line, f"in {self.text!r}: stopped: {e}") from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, MemoryError, RecursionError,
                jinja2.exceptions.SecurityError) as e:
            raise TemplateError(self.path, self.line, f"in {self.text!r}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise TemplateError(self.path, self.line, f"in {self.text!r}: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.restore(saved)


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
            tree = ENV.parse(_mark_lines(self.text))
            compiled = ENV.from_string(tree)
            undefined = _undefined_names(tree, set(self.params))
        except jinja2.TemplateSyntaxError as e:
            line = e.lineno or self.text.count("\n") + 1
            raise TemplateError(self.path, line, f"template syntax error: {e.message}") from None
        except (RecursionError, MemoryError, ValueError, OverflowError) as e:  # nesting too deep for the compiler
            raise TemplateError(self.path, None, f"template cannot be compiled: {type(e).__name__}: {e}") from None
        if undefined:  # a typo in the body: say so when the template loads, for every command
            line, name = undefined[0]
            sees = ", ".join([*self.params, "ceil_div", "min", "max", "range", "namespace"])
            raise TemplateError(self.path, line, f"undefined name {name!r} (the body sees only {sees}; shape "
                                                 "sizes and the dtype reach the kernel at run time, e.g. x_shape[0])")
        return compiled

    def render(self, params: dict) -> Rendered:
        compiled = self._jinja
        saved = _BUDGET.start()
        nlines = self.text.count("\n") + 1
        try:
            context = compiled.new_context(dict(params))
            parts, size = [], 0
            for part in compiled.root_render_func(context):  # counted as it comes, not after
                size += len(part)
                if size > MAX_RENDER_CHARS:
                    raise RenderLimit(f"rendered more than {MAX_RENDER_CHARS} characters")
                parts.append(part)
            body = "".join(parts)
            header = context.get_exported().get("header", "") or ""
            if not isinstance(header, str):
                _want(_size(header), "the header")
            header = str(header)
            if len(body) + len(header) > MAX_RENDER_CHARS:
                raise RenderLimit(f"rendered {len(body) + len(header)} characters (at most {MAX_RENDER_CHARS})")
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None) or _template_line(e.__traceback__, nlines, compiled)
            undefined = _undefined_message(e) if isinstance(e, jinja2.UndefinedError) else None
            raise TemplateError(self.path, line, f"{undefined} (rendering with {params})" if undefined
                                else f"rendering with {params}: {e}") from None
        except RenderLimit as e:
            raise TemplateError(self.path, _template_line(e.__traceback__, nlines, compiled),
                                f"rendering with {params} was stopped: {e}") from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, MemoryError, RecursionError) as e:
            raise TemplateError(self.path, _template_line(e.__traceback__, nlines, compiled), f"rendering with {params}: {e}") from None
        except Exception as e:  # noqa: BLE001 (a stranger's template: any failure is the template's)
            raise TemplateError(self.path, _template_line(e.__traceback__, nlines, compiled),
                                f"rendering with {params}: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.restore(saved)
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
    k = re.search(rf"^\s*([\"']?){re.escape(key)}\1\s*=", text[start:], re.M)
    return text.count("\n", 0, start + (k.start() if k else 0)) + 1 + (1 if k and text[start + k.start()] == "\n" else 0)


def load(path: Path | str) -> Template:
    """Parse a template file (errors name the file and line)."""
    path = Path(path)
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise TemplateError(path, None, f"template of {path.stat().st_size} bytes (at most {MAX_TEMPLATE_BYTES})")
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
    # names go into the kernel's C++ (signature, template parameters, launch spec) as they are
    for section, key, names in (("meta", "inputs", need("meta", "inputs")), ("meta", "outputs", need("meta", "outputs")),
                                ("params", None, list(params)),
                                ("template_args", None, list(meta.get("template_args", {})))):
        if key is not None and not isinstance(names, list):
            raise TemplateError(path, _line_of(text, hdr_off, key, section), f"[{section}] {key} must be a list of names")
        for name in names:
            if not isinstance(name, str) or not _IDENT.fullmatch(name):
                where = _line_of(text, hdr_off, key or str(name), section)
                what = f"[{section}] {key} entry" if key else f"[{section}] name"
                raise TemplateError(path, where, f"{what} {name!r} is not a C identifier (letters, digits, _)")
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
