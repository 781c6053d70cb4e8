"""The command line: list, render, check, sweep, show.

    python -m hlh_mlx sweep matmul                 # emulator off a Mac: checks variants
    python -m hlh_mlx sweep matmul --backend cuda  # on an NVIDIA GPU: checks, times, ranks
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import click

from . import backends, ops, rank, store, sweep as sweep_mod, templates, variants
from .progress import Progress, eta_text
from .templates import TemplateError
from .variants import SpaceError

FORMATS = click.Choice(["table", "json", "csv", "md"])


def _op(name: str) -> ops.OpSpec:
    try:
        return ops.get(name)
    except KeyError as e:
        raise click.UsageError(str(e.args[0])) from None


def _template(op: ops.OpSpec, name: str, backend: str = "metal") -> templates.Template:
    """A template by family (`tiled`), or by name (`tiled.cuda`); a bare family name picks
    the template of `backend` when the family exists for several."""
    found = [t for t in _templates(op.name) if name in (t.family, t.name, t.path.name)]
    found.sort(key=lambda t: t.backend != backend)
    if not found:
        known = ", ".join(t.name for t in _templates(op.name)) or "none"
        raise click.UsageError(f"unknown template {name!r} for {op.name} (known: {known})")
    return found[0]


def _templates(op_name: str | None = None) -> list[templates.Template]:
    try:
        return templates.discover(op_name)
    except TemplateError as e:
        raise click.ClickException(str(e)) from None


def _params(template: templates.Template, pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep:
            raise click.UsageError(f"-p takes KEY=VALUE, got {pair!r}")
        if key not in template.params:
            raise click.UsageError(f"{template.path}: unknown parameter {key!r} "
                                   f"(the space has {', '.join(template.params) or 'none'})")
        choices = template.params[key]
        match = [c for c in choices if str(c) == val]
        if not match:
            raise click.UsageError(f"{template.path}: {key}={val} is outside the space ({key} in {choices})")
        out[key] = match[0]
    return out


def _dtypes(op: ops.OpSpec, dtypes) -> None:
    for d in dtypes:
        if d not in op.dtypes:
            raise click.UsageError(f"[{op.name}] unsupported dtype {d!r} (one of {', '.join(op.dtypes)})")


def _shapes(op, texts):
    try:
        return [op.parse_shape(t) for t in texts] or None
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _workers_options(f):
    f = click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
                     metavar="[ADDRESS|auto|local]",
                     help="Run the jobs as tasks on a Ray cluster (pip install 'hlh_mlx[ray]'): ADDRESS "
                          "(host:6379, ray://host:10001), auto (the running cluster), local (start one here); "
                          "bare: $RAY_ADDRESS or a cluster running here, else a local one.")(f)
    f = click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Run N variants at once, each in a worker process of its own (one GPU each on a "
                          "multi-GPU host; the cores shared out on the emulator). With --ray: tasks at once.")(f)
    return f


def _ray_pool(ray_address, backend: str, workers):
    """(pool, device) on the Ray cluster, or (None, None) without --ray."""
    if ray_address is None:
        return None, None
    from . import pool as pool_mod, ray_pool
    try:
        return ray_pool.make(ray_address, backend, workers)
    except pool_mod.PoolError as e:
        raise click.ClickException(str(e)) from None


def _local_pool(workers, backend: str):
    """A pool of `workers` local worker processes, or None for the serial default."""
    if not workers or workers == 1:
        return None
    from . import pool as pool_mod
    try:
        return pool_mod.local(workers, backend)
    except pool_mod.PoolError as e:
        raise click.ClickException(str(e)) from None


class _Group(click.Group):
    """Template and space errors already name the file and line: every command prints them
    as one line (exit 2), never as a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TemplateError, SpaceError) as e:
            raise click.UsageError(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hlh-mlx")
def main():
    """Write, check, tune and ship custom GPU kernels for MLX."""
    warnings.showwarning = _show_warning
    from . import config
    try:
        config.check_all()
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """One line per warning (a skipped results line names its own file:line), no source echo."""
    click.echo(f"warning: {message}", err=True)


def _enforce_cache_bound():
    from . import cache
    n, freed = cache.enforce()
    if n:
        click.echo(f"cache: evicted {n} least recently used entries ({cache.human(freed)}) to stay within "
                   f"{cache.human(cache.max_bytes())} (HLH_MLX_CACHE_MAX; `hlh_mlx cache info`)", err=True)


@main.command("list")
@click.argument("op", required=False)
def list_cmd(op):
    """Ops, their templates, and the size of each parameter space."""
    names = [_op(op).name] if op else ops.names()
    for name in names:
        spec = ops.get(name)
        click.echo(f"{name}  ({'x'.join(spec.dims)}; dtypes {', '.join(spec.dtypes)})")
        for t in _templates(name):
            total = 1
            for v in t.params.values():
                total *= len(v)
            valid = len(variants.expand(t))
            click.echo(f"  {t.name:<24} {valid:>4} valid of {total:<5} {t.summary}")


@main.command()
@click.argument("op")
@click.argument("template")
@click.option("-p", "--param", "pairs", multiple=True, metavar="KEY=VAL", help="A parameter value (repeat).")
@click.option("--full", is_flag=True, help="The whole kernel source MLX compiles, signature included.")
@click.option("--dtype", default="float32", show_default=True, help="dtype for --full.")
def render(op, template, pairs, full, dtype):
    """Print a variant's kernel body (missing parameters take their first value)."""
    spec = _op(op)
    _dtypes(spec, [dtype])
    t = _template(spec, template)
    params = {k: v[0] for k, v in t.params.items()}
    params.update(_params(t, pairs))
    try:
        v = variants.make(t, params)
        r = v.rendered
    except (SpaceError, TemplateError) as e:
        raise click.ClickException(str(e)) from None
    if not full:
        if r.header:
            click.echo(f"// ---- header ----\n{r.header}\n// ---- body ----")
        click.echo(r.source)
        return
    if t.backend == "cuda":
        from . import cuda_source
        click.echo(cuda_source.variant_source(v, spec, dtype)[0])
        return
    from .emulator import codegen
    from .ops.spec import DTYPES
    import numpy as np
    shape = spec.emulator_shapes[0]
    ins = spec.make_inputs(shape, DTYPES[dtype], np.random.default_rng(0))
    sigs = [codegen.InputSig(n, x.dtype, x.ndim, x.size) for n, x in zip(t.inputs, ins)]
    click.echo(codegen.metal_source(f"hlh_{spec.name}_{t.family}_{v.id}", r.header, r.source, sigs, t.outputs,
                                    [DTYPES[dtype]] * len(t.outputs), v.template_args(shape, dtype), False))


@main.command()
@click.argument("op")
@click.argument("template", required=False)
@click.option("--backend", type=click.Choice(["auto", *backends.BACKENDS]), default="auto", show_default=True)
@click.option("--dtype", "dtypes", multiple=True, help="dtype(s) to check (default: every dtype of the op).")
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Check a seeded sample of N variants per template.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sanitize/--no-sanitize", default=True, show_default=True,
              help="Emulator: check for races, out-of-bounds, uninitialized reads, barrier divergence.")
@click.option("-p", "--param", "pairs", multiple=True, metavar="KEY=VAL", help="Check only this variant (with TEMPLATE).")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="With --workers/--ray: seconds per variant before it counts as hung.")
@click.option("--input-seed", type=click.IntRange(0, 2 ** 32 - 1), default=None,
              help="Draw the inputs from this seed (default: a fresh one). A failure prints the seed "
                   "that replays its inputs.")
@_workers_options
def check(op, template, backend, dtypes, sample, seed, sanitize, pairs, timeout, input_seed, workers, ray_address):
    """Prove variants correct on fresh random inputs and edge shapes. Exits 1 on a failure."""
    import secrets

    import numpy as np

    from . import check as check_mod
    spec = _op(op)
    _dtypes(spec, dtypes)
    pool, device = _ray_pool(ray_address, backend, workers)
    try:
        be = device.backend if device is not None else backends.resolve(backend)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    temps = [_template(spec, template, backends.TEMPLATE_BACKEND[be])] if template else [
        t for t in _templates(spec.name) if t.backend == backends.TEMPLATE_BACKEND[be]]
    for t in temps:
        if t.backend != backends.TEMPLATE_BACKEND[be]:
            raise click.UsageError(backends.wrong_backend(t.name, t.backend, be))
    if not temps:
        raise click.UsageError(f"no {backends.TEMPLATE_BACKEND[be]} templates for {spec.name}")
    # job i draws its inputs from seed + i: one variant and dtype checked alone (-p, --dtype)
    # with a failure's printed seed gets the same inputs
    first_seed = secrets.randbits(32) if input_seed is None else input_seed
    replay = functools.partial(_replay, be=be, sanitize=sanitize)
    failures = total = 0
    jobs = []
    for t in temps:
        try:
            vs = [variants.make(t, {**{k: v[0] for k, v in t.params.items()}, **_params(t, pairs)})] if pairs \
                else variants.sample(variants.expand(t), sample, seed)
        except (SpaceError, TemplateError) as e:
            raise click.ClickException(str(e)) from None
        if not vs:
            raise click.ClickException(f"{t.path}: the space has no valid variant")
        for v in vs:
            for dtype in dtypes or spec.dtypes:
                shapes = list(spec.edge_shapes) + list(spec.emulator_shapes)
                shapes = [s for s in shapes if v.supports(s, dtype)]
                if shapes:
                    jobs.append((v, dtype, shapes, (first_seed + len(jobs)) % 2 ** 32))
    start = time.monotonic()
    pool = pool or _local_pool(workers, be)
    if jobs:
        click.echo(f"checking {len(jobs)} variant x dtype pairs of {spec.name} on {be}"
                   + (f" with {len(pool)} {'Ray task slots' if pool.kind == 'ray' else 'workers'}" if pool else ""))
    if pool is not None:
        failures = _check_in_pool(pool, spec, be, jobs, sanitize, timeout, start, replay)
        click.echo(f"{len(jobs) - failures} passed, {failures} failed")
        _enforce_cache_bound()
        sys.exit(1 if failures else 0)
    for v, dtype, shapes, input_seed in jobs:
        total += 1
        err = None
        try:
            k = backends.Kernel(v, be, sanitize=sanitize)
            rng = np.random.default_rng(input_seed)
            _, err = check_mod.check_shapes(k, spec, v, shapes, dtype, rng, repeat=be in backends.CHECKED_TWICE)
        except Exception as e:  # report and go on: one bad variant does not stop the check
            err = backends.map_compile_error(e, v)
        failures += err is not None
        mark = "ok  " if err is None else "FAIL"
        where = f"[{total}/{len(jobs)}, eta {eta_text(total, len(jobs), time.monotonic() - start)}]"
        click.echo(f"{where} {mark} {v.label()} {dtype} [{v.id}]"
                   + (f"\n     {err}\n     {replay(v, dtype, input_seed)}" if err else ""))
    click.echo(f"{total - failures} passed, {failures} failed")
    _enforce_cache_bound()
    sys.exit(1 if failures else 0)


def _replay(v, dtype: str, seed: int, *, be: str, sanitize: bool) -> str:
    """The command that checks this variant alone on the inputs it just failed on."""
    params = " ".join(f"-p {k}={val}" for k, val in v.param_dict.items())
    return (f"replay: hlh_mlx check {v.template.op} {v.template.family} {params} --backend {be} "
            f"--dtype {dtype} --input-seed {seed}" + ("" if sanitize else " --no-sanitize"))


def _check_in_pool(pool, spec, be, jobs, sanitize, timeout, start, replay) -> int:
    """`check`'s jobs on a pool's workers, each line printed as its verdict comes in;
    returns the number of failures."""
    from . import pool as pool_mod
    count = {"done": 0, "failed": 0}
    every = max(1, len(jobs) // 10)

    def job(item):
        v, dtype, shapes, seed = item
        return {"kind": "variant", "op": spec.name, "backend": be, "dtype": dtype, "template": str(v.template.path),
                "params": v.param_dict, "check_shapes": shapes, "time_shape": None, "time": False,
                "seed": seed, "sanitize": sanitize}

    def verdict(item, lane, reply):
        v, dtype, _, seed = item
        count["done"] += 1
        status = reply.get("status")
        err = None if status == "ok" else (reply.get("error") or str(status))
        if status in ("crashed", "timeout"):
            err = f"{status}: {err}"
        count["failed"] += err is not None
        n = count["done"]
        where = f"[{n}/{len(jobs)}, eta {eta_text(n, len(jobs), time.monotonic() - start)}, {lane.name}]"
        click.echo(f"{where} {'ok  ' if err is None else 'FAIL'} {v.label()} {dtype} [{v.id}]"
                   + (f"\n     {err}\n     {replay(v, dtype, seed)}" if err else ""))
        if n % every == 0 and n < len(jobs):
            click.echo(f"  {pool.states()}")

    try:
        pool_mod.run_unordered(pool, jobs, job, timeout, label=lambda it: f"{it[0].label()} {it[1]}",
                               on_result=verdict)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted after {count['done']} of {len(jobs)} checks", err=True)
        sys.exit(130)
    return count["failed"]


@main.command()
@click.argument("op")
@click.option("--shape", "shape_texts", multiple=True, help="Shape to tune, e.g. 4096x4096x4096 or M=1,N=4096,K=4096 (repeat).")
@click.option("--dtype", "dtypes", multiple=True, help="dtype(s) (default float32).")
@click.option("--backend", type=click.Choice(["auto", *backends.BACKENDS]), default="auto", show_default=True)
@click.option("--template", default=None, help="Sweep only this template family.")
@click.option("--budget", type=click.IntRange(min=1), default=None, help="At most N variants: a seeded sample, then neighbours of the best.")
@click.option("--variant", "picks", multiple=True, metavar="K=V,K=V",
              help="Run this variant of --template first (repeat); the budget beyond these goes to their neighbours.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show only the N best variants.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help="Seconds per variant before it counts as hung.")
@click.option("--retime", is_flag=True, help="Time the built-in and the stored winner again in this run, "
              "even if no variant is new (e.g. on another machine, before comparing).")
@click.option("--retry-failed", is_flag=True, help="Run again every stored failure (environmental ones - no "
              "compiler, timeout, crash - are always retried).")
@click.option("--force", is_flag=True, help="Run every variant again, whatever is stored.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@_workers_options
def sweep(op, shape_texts, dtypes, backend, template, budget, picks, seed, top, timeout, retime, retry_failed, force,
          fmt, workers, ray_address):
    """Check the variants of OP and, on a GPU, time them against the MLX built-in and rank
    them (latency in a dependent chain plus host cost per call); store the results. On the
    emulator (no GPU) variants are only checked: a seeded sample of 16 unless --budget.

    Exits 1 when no variant passed, 0 otherwise."""
    spec = _op(op)
    _dtypes(spec, dtypes)
    if picks and not template:
        raise click.UsageError("--variant needs --template (the family the parameters belong to)")
    pool, device = _ray_pool(ray_address, backend, workers)
    if device is not None:  # the cluster's device decides the back end
        backend = device.backend
    if (top or retime) and (device.backend if device is not None else backends.resolve(backend)) == "emulator":
        raise click.UsageError(f"{'--top' if top else '--retime'} needs a GPU: the emulator checks variants, "
                               "it does not time or rank them")
    try:
        pick_params = None
        if picks:
            tb = backends.TEMPLATE_BACKEND[device.backend if device is not None else backends.resolve(backend)]
            t = next((t for t in _templates(spec.name) if template in (t.family, t.name) and t.backend == tb), None)
            if t is None:
                t = _template(spec, template, tb)  # unknown: names the known ones
                raise click.UsageError(backends.wrong_backend(t.name, t.backend, backends.resolve(backend)))
            pick_params = [_params(t, text.split(",")) for text in picks]
        p = sweep_mod.plan(spec.name, shapes=_shapes(spec, shape_texts), dtypes=list(dtypes) or None,
                           backend=backend, budget=budget, seed=seed, timeout=timeout, template=template,
                           retime=retime, retry_failed=retry_failed, force=force, picks=pick_params,
                           device=device)
    except (ValueError, TemplateError, SpaceError) as e:
        raise click.UsageError(str(e)) from None
    pool = pool or _local_pool(workers, p.backend)
    err = click.echo if fmt == "table" else (lambda m: click.echo(m, err=True))
    err(f"{spec.name} on {p.device.name} [{p.backend}]: {len(p.candidates)} of {len(p.space)} variants, "
        f"shapes {', '.join(spec.shape_str(s) for s in p.shapes)}, dtypes {', '.join(p.dtypes)}")
    for n in p.notes:
        err(f"note: {n}")
    if pool is not None:
        err(f"note: {len(pool)} {'Ray task slots' if pool.kind == 'ray' else 'worker processes'}"
            + (f" ({', '.join(f'{x.name} on GPU {x.pin}' for x in pool.lanes)})" if any(x.pin for x in pool.lanes)
               else ""))
    if not p.device.can_time:
        err("note: the emulator has no speed: variants are checked for correctness, not timed or ranked")
    per_shape = max(len(p.candidates), p.budget or 0) if p.device.can_time else len(p.candidates)
    n_jobs = len(p.shapes) * len(p.dtypes) * (per_shape + (1 if p.device.can_time else 0))
    from .pool import MixedDevicesError
    try:
        with Progress(n_jobs, f"sweeping {spec.name}", status=pool.states if pool is not None else None) as bar:
            records = sweep_mod.run(p, progress=lambda *a: bar.update(1),
                                    notify=lambda m: click.echo(f"\n{m}", err=True), pool=pool)
    except MixedDevicesError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished variants are saved in {store.path_for(p.device.slug, spec.name)}; "
                   "rerun the same command to resume", err=True)
        sys.exit(130)
    for dtype in p.dtypes:
        for shape in p.shapes:
            rows = rank.table_rows(records, spec.name, shape, dtype, p.backend, top)
            title = f"{spec.name} {spec.shape_str(shape)} {dtype} on {p.device.name} [{p.backend}]"
            click.echo(rank.render(rows, fmt, title, rank.columns_for(rows)))
            for a in rank.repeat_agreement(records, shape, dtype, p.backend):
                err(f"timed twice: {a['variant']} {a['first_ms']:.4f} then {a['second_ms']:.4f} ms "
                    f"({a['diff_pct']:.1f}% apart)")
    latest = {}  # the newest record of each variant: a retried failure counts as its retry
    for r in records:
        if r.get("template") != "builtin" and not r.get("repeat"):
            latest[store.result_key(r)] = r
    passed = [r for r in latest.values() if r.get("correct")]
    bad = len(latest) - len(passed)
    err(f"results: {store.path_for(p.device.slug, spec.name)} ({bad} incorrect or failed)")
    _enforce_cache_bound()
    if not passed:
        kinds = sorted({str(r.get("status")) for r in latest.values()})
        click.echo(f"error: no variant passed ({bad} failed: {', '.join(kinds) or 'none run'})"
                   + ("; environmental failures are retried on the next run"
                      if any(r in latest.values() for r in store.to_redo(records)) else ""), err=True)
        sys.exit(1)


@main.command()
@click.argument("op")
@click.option("--device", default=None, help="Device folder under variants/ (default: this machine's).")
@click.option("--backend", type=click.Choice(["auto", *backends.BACKENDS]), default="auto", show_default=True)
@click.option("--shape", "shape_texts", multiple=True)
@click.option("--dtype", "dtypes", multiple=True)
@click.option("--source", default=None, help="Results from this source: local (the default), shipped, "
              "hub:OWNER/NAME@REV, or all (one table per source).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def show(op, device, backend, shape_texts, dtypes, source, fmt):
    """Stored results for OP, ranked against the built-in of the same source.

    Only this machine's own (`local`) results by default (or, when there are none, the
    results shipped with hlh_mlx): a pulled pack's numbers are never ranked with, or shown
    as, the user's own. Every table names its source."""
    spec = _op(op)
    be = backends.auto() if backend == "auto" else backend
    slug = device or backends.device(be).slug
    records = store.load(slug, spec.name)
    src_of = lambda r: r.get("source", "local")  # noqa: E731
    counts: dict[str, int] = {}
    for r in records:
        counts[src_of(r)] = counts.get(src_of(r), 0) + 1
    if source == "all":
        wanted_sources = sorted(counts, key=lambda s_: (s_ != "local", s_ != "shipped", s_))
    elif source:
        wanted_sources = [source]
    elif "local" not in counts and "shipped" in counts:  # nothing of your own: what hlh_mlx ships, labelled
        click.echo("note: no local results; showing the results shipped with hlh_mlx (source shipped)", err=True)
        wanted_sources = ["shipped"]
    else:
        wanted_sources = ["local"]
    others = {s_: n for s_, n in counts.items() if s_ not in wanted_sources}
    for s_, n in sorted(others.items()):
        click.echo(f"note: {n} results from {s_} are not shown (--source {s_}, or --source all)", err=True)
    if not any(s_ in counts for s_ in wanted_sources):
        raise click.ClickException(f"no stored results for {spec.name} on {slug} from {' or '.join(wanted_sources)} "
                                   f"(in {store.path_for(slug, spec.name)})")
    current = {v.id for t in _templates(spec.name) for v in variants.expand(t)} | {None}
    wanted = _shapes(spec, shape_texts)
    for src in wanted_sources:
        mine = [r for r in records if src_of(r) == src]
        # results from packs name their own templates: only local ones can be stale
        stale = [r for r in mine if r.get("variant_id") not in current and src in ("local", "shipped")]
        if stale:
            click.echo(f"note: {len(stale)} results of older template versions (source changed) are not shown",
                       err=True)
            mine = [r for r in mine if r not in stale]
        keys = sorted({(r["backend"], r["shape_str"], r["dtype"]) for r in mine})
        unreadable = {}
        for be_, sstr, dtype in keys:
            try:
                shape = spec.parse_shape(sstr)
            except ValueError as e:
                unreadable.setdefault(str(e).split("] ", 1)[-1].split(": ", 1)[-1], []).append(sstr)
                continue
            if (wanted and shape not in wanted) or (dtypes and dtype not in dtypes):
                continue
            rows = rank.table_rows(mine, spec.name, shape, dtype, be_)
            for row in rows:
                row["source"] = src
            click.echo(rank.render(rows, fmt, f"{spec.name} {sstr} {dtype} on {slug} [{be_}] source {src}",
                                   rank.columns_for(rows)))
        for why, shapes in unreadable.items():  # e.g. records from before the op gained a dimension
            click.echo(f"note: results from {src} at {len(shapes)} shape(s) not shown ({', '.join(sorted(set(shapes))[:3])}"
                       f"{' ...' if len(set(shapes)) > 3 else ''}): {why}", err=True)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=__import__("pathlib").Path))
def guard(paths):
    """Anti-cheat check of templates (.j2) and kernel files (.py). Exits 1 on a finding.

    Templates must render without host escapes and write every output correctly on fresh
    random inputs. Python files are scanned for patched timers, identity caches, hard-coded
    shapes, built-in fallbacks inside `except`, and side streams. Default: templates/.
    Counts and an ETA go to stderr (a line every tenth of the work when piped).
    """
    from pathlib import Path

    from . import guard as guard_mod, paths as paths_mod
    targets = list(paths) or paths_mod.template_roots()[:1]
    for p in targets:
        if not Path(p).is_dir() and not (Path(p).suffix == ".py" or Path(p).name.endswith(".j2")):
            raise click.UsageError(f"{p}: guard checks templates (.j2) and Python files (.py), or folders of them")
    jobs = guard_mod.plan([Path(p) for p in targets])  # templates are loaded here: the count is known
    with Progress(len(jobs), "guarding") as bar:  # on stderr: the findings on stdout stay as they were
        findings = guard_mod.run(jobs, progress=lambda: bar.update(1))
    for f in findings:
        click.echo(("" if f.blocking else "note: ") + str(f))
    blocking = [f for f in findings if f.blocking]
    click.echo(f"guard: {len(blocking)} finding(s) in {', '.join(str(p) for p in targets)}")
    sys.exit(1 if blocking else 0)


@main.command()
@click.argument("op")
@click.option("--variant", "variant_id", required=True, help="Variant id (from `hlh_mlx show`).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write.")
@click.option("--format", "fmt", type=click.Choice(["module", "kernelbot"]), default="module", show_default=True,
              help="kernelbot adds a competition-style custom_kernel(data).")
def export(op, variant_id, output, fmt):
    """Write one variant as a self-contained module that needs only mlx."""
    from . import export as export_mod
    spec = _op(op)
    try:
        text = export_mod.render_module(spec.name, variant_id, fmt)
    except export_mod.ExportError as e:
        raise click.ClickException(str(e)) from None
    try:
        with open(output, "w") as f:
            f.write(text)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(f"wrote {output}")


@main.command()
@click.argument("repo_id")
@click.option("--op", "op_names", multiple=True, help="Only these ops (repeat; default: every op with results).")
@click.option("--device", default=None, help="Device folder under variants/ (default: this machine's).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
def push(repo_id, op_names, device, private):
    """Upload this device's tuned results as a pack to the Hub repo REPO_ID."""
    from . import hub
    for name in op_names:
        _op(name)
    slug = device or backends.device(backends.auto()).slug
    try:
        url, commit = hub.push(repo_id, slug, list(op_names) or None, private=private)
    except hub.PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pushed {slug} results to {url} (commit {commit})")


@main.command()
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--trust", is_flag=True, help="Let hlh_mlx.tuned build and run this pack's kernels.")
def pull(repo_id, revision, trust):
    """Download, verify and install a pack of tuned results from the Hub repo REPO_ID."""
    from . import hub
    try:
        report = hub.pull(repo_id, revision, trust=trust)
    except hub.PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(report))


@main.command()
@click.argument("repo_id")
@click.option("--revoke", is_flag=True, help="Stop trusting it.")
def trust(repo_id, revoke):
    """Trust the installed commit of a pulled pack: hlh_mlx.tuned may then run its kernels."""
    from . import hub
    try:
        source = hub.set_trusted(repo_id, not revoke)
    except hub.PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"no longer trusting {repo_id}" if revoke else f"trusting {source}")


@main.command()
def packs():
    """List installed packs: source, device, ops, trust."""
    from . import hub
    found, broken = hub.installed(), hub.broken()
    if not found and not broken:
        click.echo("no packs installed")
    for repo_id, meta in found.items():
        click.echo(f"{meta['source']}  {meta['device']}  {', '.join(map(str, meta['ops']))}  "
                   f"{'trusted' if hub.is_trusted(meta['source']) else 'not trusted'}")
    for repo_id, e in broken.items():
        click.echo(f"hub:{repo_id}  BROKEN: {e} (`hlh_mlx remove {repo_id}`, then pull it again)")
    if broken:
        sys.exit(1)


@main.command("remove")
@click.argument("repo_id")
def remove_pack(repo_id):
    """Remove a pulled pack and every result it installed."""
    from . import hub
    try:
        n = hub.remove(repo_id)
    except hub.PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"removed {repo_id}: {n} results")


@main.group()
def cache():
    """The compile cache ($HLH_MLX_CACHE, default ~/.cache/hlh_mlx), bounded by $HLH_MLX_CACHE_MAX."""


@cache.command("info")
def cache_info():
    """Where the cache is, how big, and its bound."""
    from . import cache as cache_mod
    try:
        i = cache_mod.info()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    bound = cache_mod.human(i["max_bytes"]) if i["max_bytes"] else "none"
    click.echo(f"{i['root']}: {cache_mod.human(i['bytes'])} ({i['kernels']} kernels, {i['runtimes']} runtimes, "
               f"{i['partial']} partial builds); bound {bound} (HLH_MLX_CACHE_MAX)")


@cache.command("clean")
@click.option("--all", "everything", is_flag=True, help="Remove everything (rebuilt on demand).")
@click.option("--max-size", default=None, metavar="SIZE", help="Evict least recently used kernels down to SIZE "
              "(e.g. 500M; default the bound, $HLH_MLX_CACHE_MAX or 1G).")
def cache_clean(everything, max_size):
    """Evict compiled kernels, least recently used first (everything with --all)."""
    from . import cache as cache_mod
    try:
        limit = cache_mod.parse_size(max_size) if max_size is not None else None
        n, freed = cache_mod.clean(limit, everything=everything)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"removed {n} entries ({cache_mod.human(freed)}); {cache_mod.human(cache_mod.total_bytes())} left "
               f"in {cache_mod.root()}")


def _model_options(fn):
    """MODEL and the options that build a named config (a checkpoint loads as saved)."""
    fn = click.option("--dtype", "model_dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
                      help="Activations and unquantized weights of a named config (default float16).")(fn)
    fn = click.option("--layers", type=click.IntRange(min=1), default=None,
                      help="Decoder blocks of a named config (default: all; the blocks' shapes are kept).")(fn)
    fn = click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
                      help="Quantization group of a named config (default 64).")(fn)
    fn = click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
                      help="Weights of a named config: 4- or 8-bit as mlx-lm quantizes, 16 unquantized (default 4).")(fn)
    return click.argument("model")(fn)


def _model_kwargs(bits, group_size, layers, model_dtype) -> dict:
    return {"bits": int(bits) if bits else None, "group_size": int(group_size) if group_size else None,
            "layers": layers, "dtype": model_dtype}


@main.command()
@_model_options
@click.option("--prompt-tokens", type=click.IntRange(min=2), default=512, show_default=True,
              help="The prefill size recorded (decode is recorded too).")
@click.option("--budget", type=int, default=12, show_default=True, help="Variants per recorded call.")
@click.option("--backend", type=click.Choice(["auto", *backends.BACKENDS]), default="auto", show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per variant before it counts as hung.")
def tune(model, bits, group_size, layers, model_dtype, prompt_tokens, budget, backend, timeout):
    """Sweep exactly the calls MODEL makes, on this device.

    MODEL is an mlx-lm checkpoint directory (config.json, model*.safetensors) or a named
    config built with random weights (llama-3-8b, qwen3-8b, qwen2-7b, qwen1.5-moe-a2.7b,
    tiny-llama, ...). The model is patched, run once (a prefill and a few decode steps),
    and each (op, shape, dtype) it calls is swept; then what the patched model runs is
    printed. Interrupted: run it again to resume."""
    from . import model_tune, models
    try:
        m, about = models.load(model, **_model_kwargs(bits, group_size, layers, model_dtype))
    except models.ModelError as e:
        raise click.UsageError(str(e)) from None
    try:
        result = model_tune.tune(m, prompt_tokens=prompt_tokens, budget=budget, backend=backend, timeout=timeout,
                                 progress=Progress, notify=lambda msg: click.echo(msg, err=True))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished variants are saved; run the same command to resume", err=True)
        sys.exit(130)
    click.echo(model_tune.summary(result))
    _enforce_cache_bound()


@main.command()
@_model_options
@click.option("--tokens", "max_tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Tokens generated per run.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per side (median).")
@click.option("--mode", "modes", type=click.Choice(["uncompiled", "compiled"]), multiple=True,
              help="How both sides run (repeat; default both).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random weights of a named config and the prompt.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every figure here (default: hlh_mlx-validate-<model>.json in this directory).")
def validate(model, bits, group_size, layers, model_dtype, max_tokens, prompt_tokens, repeats, modes, seed, json_path):
    """Generate with MODEL unpatched, then patched (hlh_mlx.patch): same prompt, greedy.

    Prints prefill and decode tokens per second of both sides, uncompiled and compiled,
    with the device and date, and writes them as JSON. Both sides are also fed the
    unpatched model's tokens, and then random tokens, and their logits compared at every
    position (teacher-forced: a model with random weights may repeat one token, which tests
    little). Exits 1 when those logits differ by more than rounding does, or when the greedy tokens
    differ (naming the first position where they do, and whether fed the same tokens the
    sides part there: a near tie, or not at all) unless the unpatched model's own repeats part from each other there or
    earlier (a GPU whose ops are not deterministic): then the patched model followed it as
    far as it follows itself, and the summary says so."""
    import json
    from pathlib import Path

    from . import models, validate as validate_mod
    try:
        result = validate_mod.validate(model, max_tokens=max_tokens, prompt_tokens=prompt_tokens, repeats=repeats,
                                       modes=modes or validate_mod.MODES, seed=seed,
                                       **_model_kwargs(bits, group_size, layers, model_dtype))
    except (models.ModelError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(validate_mod.summary(result))
    name = Path(model).name if Path(model).is_dir() else model
    out = Path(json_path or f"hlh_mlx-validate-{name}.json")
    out.write_text(json.dumps(result, indent=1))
    click.echo(f"written: {out}")
    if not result["ok"]:
        bad = [f"{m}: tokens part at position {e['first_divergence']}"
               + (f" ({validate_mod.PARTING_NOTE[e['parting']]})" if e.get("parting") else "")
               for m, e in result["modes"].items()
               if not (e["tokens_identical"] or e.get("within_reference_variation"))]
        bad += [f"{m}: teacher-forced logits{label} differ by {100 * e[key]['max_relative_delta']:.3g}% "
                f"of their largest (tolerance {100 * e[key]['tolerance']:.3g}%)"
                for m, e in result["modes"].items()
                for key, label in (("teacher_forced", ""), ("teacher_forced_random", " (random tokens)"))
                if key in e and not e[key]["ok"]]
        click.echo(f"error: the patched model differs from the unpatched one ({'; '.join(bad)})", err=True)
        sys.exit(1)
