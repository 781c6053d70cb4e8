"""`hlh_mlx tune MODEL`: sweep exactly the calls a model makes, on this device.

1. Patch the model and run it once through mlx-lm's generation loop (a prefill of
   `prompt_tokens` and a few decode steps); every tuned call it makes is decided once per
   (op, shape, dtype) by hlh_mlx.runtime, which is the record of what to tune.
2. Sweep each recorded (op, shape, dtype) with the ordinary sweep (same store, so an
   interrupted tune resumes where it stopped and a second tune only re-runs what failed).
3. Decide again and report what the patched model now runs: a variant or the built-in, why.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field


from . import backends, models, ops, patching, runtime
from . import sweep as sweep_mod


@dataclass
class Tuning:
    calls: list = field(default_factory=list)      # (op, shape dict, dtype) the model makes
    swept: list = field(default_factory=list)      # (op, shape text, dtype, passed, failed)
    skipped: list = field(default_factory=list)    # (op, shape text, dtype, why)
    decisions: dict = field(default_factory=dict)  # "op shape dtype" -> what runs and why
    seconds: float = 0.0                           # from the patch to the decisions printed


def record_calls(model, prompt_tokens: int, decode_tokens: int = 3, seed: int = 0) -> list[tuple]:
    """(op, shape, dtype) of every tuned call one generation makes, in first-call order."""
    from .validate import generate, random_prompt
    prompt = random_prompt(model, {"config": {}, "source": type(model).__name__}, prompt_tokens, seed)
    runtime.refresh()
    with runtime.lenient():
        generate(model, prompt, decode_tokens)
    return runtime.decided_calls()


def tune(model, *, prompt_tokens: int = 512, budget: int | None = 12, backend: str = "auto", timeout: float = 600.0,
         progress=None, notify=print) -> Tuning:
    """Patch `model` (in place), record its calls, sweep them, decide again. `progress(total,
    label)`: a context manager with `update(n)` for each sweep (hlh_mlx.progress.Progress)."""
    start = time.monotonic()
    be = backends.resolve(backend)
    report = patching.patch(model)
    notify(f"patched: {len(report.replaced)} layer(s) replaced, {len(report.kept)} kept")
    out = Tuning(calls=record_calls(model, prompt_tokens))
    groups: dict = {}
    for op, shape, dtype in out.calls:
        spec = ops.get(op)
        if be == "emulator" and spec.bytes(shape, 4) > sweep_mod.EMULATOR_MAX_BYTES:
            out.skipped.append((op, spec.shape_str(shape), dtype, "GPU-sized: the emulator checks small shapes only"))
            continue
        groups.setdefault((op, dtype), []).append(shape)
    for (op, dtype), shapes in groups.items():
        spec = ops.get(op)
        try:
            p = sweep_mod.plan(op, shapes=shapes, dtypes=[dtype], backend=be, budget=budget, timeout=timeout)
        except ValueError as e:  # e.g. no template of this op for the back end
            for s in shapes:
                out.skipped.append((op, spec.shape_str(s), dtype, str(e)))
            continue
        label = f"{op} {dtype} at {', '.join(spec.shape_str(s) for s in shapes)}"
        notify(f"sweeping {label} ({len(p.candidates)} of {len(p.space)} variants)")
        per_shape = max(len(p.candidates), p.budget or 0) + (1 if p.device.can_time else 0)
        with progress(len(shapes) * per_shape, label) if progress else nullcontext() as bar:
            records = sweep_mod.run(p, progress=(lambda *a: bar.update(1)) if bar else None)
        for s in shapes:
            out.swept.append((op, spec.shape_str(s), dtype, *tally(records, s)))
    record_calls(model, prompt_tokens)  # decided again, with what the sweeps stored
    out.decisions = {f"{op} {shape} {dtype}": what for (op, shape, dtype), what in runtime.decisions().items()}
    out.seconds = time.monotonic() - start
    return out


def tally(records: list[dict], shape: dict) -> tuple[int, int]:
    """(correct, failed) variants among a sweep's records at `shape`: each variant's latest
    result (a crash run again has two), not the built-in, not the second timings of the
    winner and the built-in that end a sweep (`repeat`: neither correct nor failed)."""
    latest = {r.get("variant_id"): r for r in records
              if r.get("shape") == shape and r.get("template") != "builtin" and not r.get("repeat")}
    ok = sum(1 for r in latest.values() if r.get("correct"))
    return ok, len(latest) - ok


def summary(t: Tuning) -> str:
    lines = [f"{len(t.calls)} distinct tuned call(s) in one generation; recorded, swept and decided in "
             f"{t.seconds:.0f} s"]
    for op, shape, dtype, ok, bad in t.swept:
        lines.append(f"  swept {op} {shape} {dtype}: {ok} variant(s) correct, {bad} failed" if ok + bad else
                     f"  not swept {op} {shape} {dtype}: no variant of its templates runs at this shape")
    for op, shape, dtype, why in t.skipped:
        lines.append(f"  not swept {op} {shape} {dtype}: {why}")
    lines.append("what the patched model runs now:")
    lines += [f"  {k}: {v}" for k, v in t.decisions.items()]
    return "\n".join(lines)


def load_and_tune(source: str, *, bits=None, group_size=None, layers=None, dtype=None, **kwargs) -> Tuning:
    model, _ = models.load(source, bits=bits, group_size=group_size, layers=layers, dtype=dtype)
    return tune(model, **kwargs)
