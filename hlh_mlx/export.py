"""Export one variant as a self-contained Python module that needs only `mlx`.

The module embeds the rendered source, the launch geometry (the template's expressions,
checked to be plain arithmetic, then written as Python), a shape and dtype guard, and
where the variant came from. `--format kernelbot` adds a competition-style
`custom_kernel(data)` entry point.
"""

from __future__ import annotations

import ast
from datetime import date

from . import __version__, ops, templates, variants
from .variants import Variant

_ALLOWED_CALLS = {"ceil_div", "min", "max"}


class ExportError(ValueError):
    pass


def _python_expr(text: str, params: dict, where: str) -> str:
    """A template launch expression as Python, parameters substituted; only arithmetic."""
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        raise ExportError(f"{where}: {text!r} is not a plain arithmetic expression") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
                               ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.Call))
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _ALLOWED_CALLS and not node.keywords
        if isinstance(node, ast.Constant):
            ok = isinstance(node.value, int)
        if not ok:
            raise ExportError(f"{where}: {text!r} uses {type(node).__name__}, which export does not translate")

    class Sub(ast.NodeTransformer):
        def visit_Name(self, n):
            return ast.copy_location(ast.Constant(params[n.id]), n) if n.id in params else n
    return ast.unparse(Sub().visit(tree))


def _input_shapes(op) -> list[str]:
    """Each input's shape as a tuple of dim names: the op's own description, else read off
    inputs made at distinct primes."""
    import numpy as np
    if op.export_inputs:
        return list(op.export_inputs)

    from .ops.spec import DTYPES
    primes = dict(zip(op.dims, (101, 103, 107, 109, 113)))
    names = {v: k for k, v in primes.items()}
    made = op.make_inputs(primes, DTYPES["float32"], np.random.default_rng(0))
    return ["(" + ", ".join(names[n] for n in x.shape) + ("," if x.ndim == 1 else "") + ")" for x in made]


def _input_dtypes(op, dtypes) -> dict:
    """{op dtype: (dtype of each input)}, read off inputs made at the first emulator shape."""
    import numpy as np

    from .ops.spec import DTYPES
    out = {}
    for d in dtypes:
        made = op.make_inputs(op.emulator_shapes[0], DTYPES[d], np.random.default_rng(0))
        out[d] = tuple(str(x.dtype).split(".")[-1] for x in made)
    return out


def find(op_name: str, variant_id: str) -> Variant:
    for t in templates.discover(op_name):
        for v in variants.expand(t):
            if v.id == variant_id:
                return v
    raise ExportError(f"no current {op_name} variant with id {variant_id!r} (see `hlh_mlx show {op_name}`)")


def _identifiers(names, what: str, where: str) -> list[str]:
    """Names that become Python code (parameters, expressions) must be plain identifiers:
    template text is data, never code in the exported module."""
    import keyword
    for n in names:
        if not (isinstance(n, str) and n.isidentifier() and not keyword.iskeyword(n)):
            raise ExportError(f"{where}: {what} {n!r} is not a Python identifier")
    return list(names)


def render_module(op_name: str, variant_id: str, fmt: str = "module") -> str:
    op = ops.get(op_name)
    v = find(op_name, variant_id)
    t, r, p = v.template, v.rendered, v.param_dict
    _identifiers(t.inputs, "input name", str(t.path))
    if not op.export_dims:
        raise ExportError(f"op {op_name} has no export description")
    if op.then is not None:  # what the op runs after its kernel, written by the op's spec
        if not op.export_then:
            raise ExportError(f"op {op_name} runs MLX ops after its kernel and has no export_then to write them")
        names = {n.id for n in ast.walk(ast.parse(op.export_then, mode="eval")) if isinstance(n, ast.Name)}
        if names - set(t.inputs) - {"outs", "mx"}:
            raise ExportError(f"op {op_name}'s export_then names {sorted(names - set(t.inputs) - {'outs', 'mx'})}, "
                              f"not inputs of {t.relpath} ({', '.join(t.inputs)})")
    dims = list(op.export_dims)
    where = str(t.path)
    grid = [_python_expr(e.text, p, where) for e in t.grid]
    tg = tuple(v.threadgroup())
    targs = []
    for name, e in t.template_args.items():
        if e.text.strip() == "dtype":
            targs.append(f"({name!r}, {t.inputs[0]}.dtype)")
        else:
            targs.append(f"({name!r}, {_python_expr(e.text, p, where)})")
    factory = "mx.fast.metal_kernel" if t.backend == "metal" else "mx.fast.cuda_kernel"
    smem = v.shared_memory()
    shared = f", shared_memory={smem}" if smem else ""
    dtypes = t.dtypes or list(op.dtypes)
    input_dtypes = _input_dtypes(op, dtypes)
    from .ops.spec import DTYPES
    output_dtypes = {d: tuple(str(x).split(".")[-1] for x in op.output_dtypes(DTYPES[d])) for d in dtypes}
    # what the op runs after its kernel (qmm's matmul), an expression the op spec wrote
    then = f"\n    outs = {op.export_then}" if op.then is not None else ""
    dims_code = "\n".join(f"    {d} = {op.export_dims[d]}" for d in dims)
    guard = "\n".join(f"    if {x}.shape != {s}:\n        raise ValueError(f\"[{op.name}] {x} must have shape {s}, got {{{x}.shape}}\")"
                      for x, s in zip(t.inputs, _input_shapes(op)))
    out_shapes = ", ".join(op.export_outputs)
    args = ", ".join(t.inputs)
    # everything taken from the template (summary, names, paths) enters the module as a
    # string literal written by repr(), never spliced into code or into a docstring's quotes
    module_doc = (f"{op.name} kernel exported by hlh_mlx {__version__} on {date.today().isoformat()}.\n\n"
                  f"Variant {v.id}: {v.label()}, template {t.relpath} ({t.backend}), source hash {v.source_hash}.\n"
                  f"Self-contained: needs only mlx ({factory}). Inputs in the op's layout: {', '.join(t.inputs)}.\n")
    kernel_name = f"hlh_{op.name}_{t.family}_{v.id}"
    text = f'''{module_doc!r}

import mlx.core as mx

SOURCE = {r.source!r}
HEADER = {r.header!r}
THREADGROUP = {tg!r}
DTYPES = {tuple(dtypes)!r}
# the dtype of each input and of each output, by the dtype of the first input (the op's dtype)
INPUT_DTYPES = {input_dtypes!r}
OUTPUT_DTYPES = {output_dtypes!r}

_kernel = {factory}(name={kernel_name!r}, input_names={t.inputs!r},
                    output_names={t.outputs!r}, source=SOURCE, header=HEADER{shared})


def ceil_div(a, b):
    return -(-a // b)


def {op.name}({args}):
    {t.summary!r}
    arrays = [{args}]
    for _a in arrays:
        if not isinstance(_a, mx.array):
            raise TypeError("[{op.name}] inputs must be mx.array")
    dtype = {t.inputs[0]}.dtype
    want = INPUT_DTYPES.get(str(dtype).split(".")[-1])
    if want is None or tuple(str(_a.dtype).split(".")[-1] for _a in arrays) != want:
        raise ValueError(f"[{op.name}] inputs must have dtypes {{INPUT_DTYPES}} (by the first input's), "
                         f"got {{[_a.dtype for _a in arrays]}}")
{dims_code}
{guard}
    dtype_size = dtype.size
    grid = ({", ".join(grid)},)
    outs = _kernel(inputs=arrays, template=[{", ".join(targs)}], grid=grid, threadgroup=THREADGROUP,
                   output_shapes=[{out_shapes}],
                   output_dtypes=[getattr(mx, o) for o in OUTPUT_DTYPES[str(dtype).split(".")[-1]]]){then}
    return outs[0] if len(outs) == 1 else tuple(outs)
'''
    if fmt == "kernelbot":
        text += f'''

def custom_kernel(data):
    """Competition entry point: data is the tuple of inputs ({args})."""
    return {op.name}(*data)
'''
    compile(text, "<export>", "exec")  # never write a module that does not parse
    return text
