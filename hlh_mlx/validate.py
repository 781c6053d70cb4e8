"""`hlh_mlx validate MODEL`: the same greedy generation unpatched and patched, through
mlx-lm's own loop (`generate_step`: pipelined, the next token built while the GPU runs this
one), tokens compared one by one, prefill and decode tokens per second of both.

Two ways of running, each applied to both sides alike:
- "uncompiled": each model as it comes: mlx-lm's as mlx-lm runs it, the patched one as
  `patch` leaves it (its decoder blocks compile their own decode step);
- "compiled": every decoder block's decode step compiled the way `patch` compiles it
  (hlh_mlx.blocks.DecoderBlock, unfused, with the block's own layers) on both sides, so
  the difference left is the kernels'.
Each side is warmed up (kernels built, plans decided) before it is timed; the figures are
the medians of `repeats` timed generations per side, the two sides' generations alternated
(`PatchReport.unpatched()` puts the original layers back for the unpatched ones), so that
a drifting machine moves both alike."""

from __future__ import annotations

import datetime
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backends, blocks, devices, models, patching, runtime

MODES = ("uncompiled", "compiled")


@dataclass
class Run:
    tokens: list
    prefill_s: float   # prompt in to first token out
    decode_s: float    # first token out to last token out

    def rates(self, prompt_tokens: int) -> dict:
        n = len(self.tokens)
        return {"prefill_tps": prompt_tokens / self.prefill_s,
                "decode_tps": (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else None}


def generate(model: nn.Module, prompt: list[int], max_tokens: int) -> Run:
    """Greedy tokens through mlx-lm's generation loop, with the times a user sees."""
    from mlx_lm.generate import generate_step
    tokens, stamps = [], []
    start = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                  sampler=lambda logprobs: mx.argmax(logprobs, axis=-1)):
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    return Run(tokens, stamps[0] - start, stamps[-1] - stamps[0])


def decoder_blocks(model: nn.Module) -> list:
    """The model's decoder blocks (mlx-lm models list them as `.layers`)."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    return layers if isinstance(layers, list) else []


@contextmanager
def compiled_blocks(model: nn.Module, wrappers: dict | None = None):
    """Every decoder block's decode step compiled as hlh_mlx.blocks.DecoderBlock compiles
    it (unfused, with the block's own layers): what `patch` does to a patched model's
    blocks, done to an unpatched one, so both sides are compiled alike. `wrappers` keeps the
    wrappers, and their traces, across entries."""
    wrappers = {} if wrappers is None else wrappers
    layers = decoder_blocks(model)
    originals = list(layers)
    for i, b in enumerate(layers):
        if not isinstance(b, blocks.DecoderBlock) and blocks.why_not(b) is None:
            # a wrapper holds the children the block had when it was made: one per block and
            # set of layers in it (`PatchReport.unpatched()` swaps layers inside kept blocks)
            key = tuple(id(m) for m in b.modules())
            if key not in wrappers:
                wrappers[key] = (b, blocks.DecoderBlock(b, fused=False))  # b held: its ids stay its own
            layers[i] = wrappers[key][1]
    try:
        yield
    finally:
        layers[:] = originals


def first_divergence(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def self_divergence(runs: list) -> int | None:
    """The first position where one side's own repeats part (the earliest over pairs of
    repeats); None when every repeat made the same tokens."""
    parts = [d for i, a in enumerate(runs) for b in runs[i + 1:] if (d := first_divergence(a, b)) is not None]
    return min(parts) if parts else None


def reference_divergence(runs: list) -> int | None:
    """How far one side's own repeats follow each other at most: the latest position where
    two of them part. None when two repeats made the same tokens (the side can repeat
    itself, so nothing but identical tokens passes) or there is only one."""
    parts = [first_divergence(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    return None if not parts or None in parts else max(parts)


def divergence_from(reference: list, tokens: list) -> int | None:
    """Where `tokens` leaves every run of `reference`: the longest agreement with any of them
    (None when it equals one)."""
    parts = [first_divergence(r, tokens) for r in reference]
    return None if None in parts else max(parts)


# Teacher-forced logits of the two sides may differ by this much, relative to the largest
# logit of the position, and still be one computation rounded in another order: a 32-layer
# fp16 step carries a few ulps per layer. A kernel that computes something else (a dropped
# bias, a wrong rotation, a missing norm) moves the logits by O(1) of their scale.
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


PREFILL_STEP = 2048  # mlx-lm's generate_step default prefill_step_size


def forced_logits(model: nn.Module, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits of each greedy step with `tokens` fed back in, whatever
    the model would have picked: the prompt but its last token prefilled in chunks of
    PREFILL_STEP, then one-token decode steps (the last prompt token, then tokens[:-1]), as
    mlx-lm's generate_step runs them (so the same calls are made, at the same shapes)."""
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    for i in range(0, len(prompt) - 1, PREFILL_STEP):
        mx.eval(model(mx.array(prompt[i:min(i + PREFILL_STEP, len(prompt) - 1)])[None], cache=cache))
    out = []
    for t in [prompt[-1], *tokens[:-1]]:
        logits = model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)
        mx.eval(logits)
        out.append(np.asarray(logits))
    return np.stack(out)


def compare_logits(reference: np.ndarray, other: np.ndarray, tolerance: float) -> dict:
    """Per position: the largest logit difference (`delta`), relative to the reference's
    largest |logit|; where the two argmaxes differ, the reference's gap between its top two
    (a flip needs gap <= 2 * delta: a near tie, not a wrong kernel, when delta is within
    tolerance). `ok`: every position within `tolerance`."""
    delta = np.max(np.abs(reference - other), axis=-1)
    scale = np.maximum(np.max(np.abs(reference), axis=-1), 1e-30)
    rel = delta / scale
    top2 = np.sort(reference, axis=-1)[:, -2:]
    flips = np.nonzero(np.argmax(reference, axis=-1) != np.argmax(other, axis=-1))[0]
    return {"max_relative_delta": float(rel.max()), "median_relative_delta": float(np.median(rel)),
            "tolerance": tolerance, "ok": bool(rel.max() <= tolerance),
            "argmax_flips": [{"position": int(i), "gap": float(top2[i, 1] - top2[i, 0]), "delta": float(delta[i])}
                             for i in flips]}


def _parting(div, forced: dict) -> str | None:
    """Why the greedy tokens parted at `div`, from the teacher-forced comparison (fed the
    unpatched first run's tokens, so at `div` both sides saw the same prefix): "near tie" (the
    argmaxes flip there, two logits within rounding of each other), "not reproduced" (fed the
    same tokens they agree there: one side's own runs differ, ops that are not deterministic),
    or "logits differ" (beyond the tolerance: not rounding). None when the tokens agree."""
    if div is None:
        return None
    if not forced["ok"]:
        return "logits differ"
    if any(f["position"] == div for f in forced["argmax_flips"]):
        return "near tie"
    return "not reproduced"


PARTING_NOTE = {
    "near tie": "fed the same tokens, the argmaxes flip there between two logits within rounding: a near tie",
    "not reproduced": "fed the same tokens, both sides pick the same token there: the parting is run-to-run "
                      "variation of a side whose ops are not deterministic, not a difference at the same prefix",
    "logits differ": "fed the same tokens, the logits differ beyond rounding",
}


def _summary(runs: list, prompt_tokens: int) -> dict:
    rates = [r.rates(prompt_tokens) for r in runs]
    decode = [r["decode_tps"] for r in rates if r["decode_tps"] is not None]
    return {"tokens": runs[0].tokens,
            "tokens_each": [r.tokens for r in runs],
            "repeats_agree": all(r.tokens == runs[0].tokens for r in runs),
            # a model with random weights often repeats a token or two: then "tokens identical"
            # says little, and the logits fed random tokens (`teacher_forced_random`) carry the check
            "distinct_tokens": len(set(runs[0].tokens)),
            "self_divergence": self_divergence([r.tokens for r in runs]),
            "prefill_tps": statistics.median(r["prefill_tps"] for r in rates),
            "decode_tps": statistics.median(decode) if decode else None,
            "prefill_tps_each": [round(r["prefill_tps"], 2) for r in rates],
            "decode_tps_each": [round(d, 2) for d in decode]}


def measure(model, prompt, max_tokens, repeats, mode) -> dict:
    """One side alone in one mode: warm-up, then `repeats` timed generations."""
    with compiled_blocks(model) if mode == "compiled" else nullcontext():
        generate(model, prompt, min(max_tokens, 4))
        return _summary([generate(model, prompt, max_tokens) for _ in range(repeats)], len(prompt))


def _measure_both(model, report, prompt, max_tokens, repeats, mode, tolerance: float,
                  probe: list[int]) -> tuple[dict, np.ndarray]:
    """({"unpatched": ..., "patched": ..., "teacher_forced": ..., "teacher_forced_random": ...},
    the unpatched side's forced logits) of one mode, the two sides' generations alternated
    (A B B A A B ...): a machine that speeds up or slows down over the run (clocks, other
    tenants, a warming cache) moves both sides' medians alike instead of favouring one."""
    wrappers: dict = {}

    @contextmanager
    def side(name):
        with report.unpatched() if name == "unpatched" else nullcontext():
            with compiled_blocks(model, wrappers) if mode == "compiled" else nullcontext():
                yield

    runs: dict = {"unpatched": [], "patched": []}
    for name in runs:
        with side(name), runtime.recording():  # every distinct call decided and counted once
            generate(model, prompt, min(max_tokens, 4))  # warm-up: kernels built, plans decided
    for r in range(repeats):
        for name in (("unpatched", "patched") if r % 2 == 0 else ("patched", "unpatched")):
            with side(name):
                runs[name].append(generate(model, prompt, max_tokens))
    out = {name: _summary(rs, len(prompt)) for name, rs in runs.items()}
    # both sides fed the unpatched model's first run: where greedy tokens part, whether the
    # logits did (a wrong kernel) or a near tie flipped (rounding in another order)
    # and both fed `probe`, random tokens: decode steps on inputs that vary, where a random-weight
    # model's own greedy tokens may be one token repeated
    forced, probed = {}, {}
    for name in runs:
        with side(name):
            forced[name] = forced_logits(model, prompt, out["unpatched"]["tokens"])
            probed[name] = forced_logits(model, prompt, probe)
    out["teacher_forced"] = compare_logits(forced["unpatched"], forced["patched"], tolerance)
    out["teacher_forced_random"] = compare_logits(probed["unpatched"], probed["patched"], tolerance)
    return out, forced["unpatched"]


def validate(source: str, *, max_tokens: int = 64, prompt_tokens: int = 512, repeats: int = 3,
             modes=MODES, seed: int = 0, **model_kwargs) -> dict:
    """Run both sides in each mode; return everything as one JSON-ready dict."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} (one of {', '.join(MODES)})")
    if max_tokens < 2 or prompt_tokens < 1 or repeats < 1:
        raise ValueError("need at least 2 tokens, a 1-token prompt and 1 repeat")
    model, about = models.load(source, seed=seed, **model_kwargs)
    prompt = random_prompt(model, about, prompt_tokens, seed)
    be = runtime.backend()
    dev = backends.device(be)
    result = {"model": {k: v for k, v in about.items() if k != "config"}, "config": about["config"],
              "device": dev.name, "device_slug": dev.slug, "backend": be, "mlx": mx.__version__,
              "mlx_lm": _mlx_lm_version(), "date": datetime.date.today().isoformat(),
              "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "repeats": repeats,
              "weight_bytes": models.weight_bytes(model), "decode_bytes": models.decode_bytes(model), "modes": {}}
    ceiling = devices.ceilings(dev.slug)
    if ceiling:
        # a decode step reads each weight it uses at least once (one embedding row, a token's
        # experts): the rate the copy bandwidth allows
        result["decode_limit_tps"] = ceiling["bandwidth_gbs"] * 1e9 / result["decode_bytes"]
    report = patching.patch(model)
    result["patch"] = report.as_dict()
    # fallbacks() counts a distinct call once, when first decided: forget the decisions the
    # patching checks made (lenient, on made-up inputs that may share a decode call's
    # shape), so that each call of the patched runs is decided, and counted, in their warm-up
    runtime.refresh()
    runtime_fallbacks_before = dict(runtime.fallbacks())
    from .ops.spec import dtype_name
    tolerance = LOGIT_TOLERANCE[dtype_name(patching._dtype_of(model))]
    probe = random_prompt(model, about, max_tokens, seed + 1)
    measured = {m: _measure_both(model, report, prompt, max_tokens, repeats, m, tolerance, probe) for m in modes}
    both = {m: out for m, (out, _) in measured.items()}
    forced_unpatched = {m: logits for m, (_, logits) in measured.items()}
    if len(modes) == 2 and all(both[m]["unpatched"]["tokens"] == both[modes[0]]["unpatched"]["tokens"] for m in modes):
        # the scale of rounding in another order, from MLX alone: the unpatched model as it
        # comes against its blocks compiled (compile fuses elementwise ops), fed the same tokens
        result["rounding_reference"] = compare_logits(forced_unpatched[modes[0]], forced_unpatched[modes[1]], tolerance)
    unpatched = {m: both[m]["unpatched"] for m in modes}
    patched = {m: both[m]["patched"] for m in modes}
    result["fallbacks"] = {f"{op}: {why}": n - runtime_fallbacks_before.get((op, why), 0)
                           for (op, why), n in runtime.fallbacks().items()}
    result["decisions"] = {f"{op} {shape} {dtype}": what for (op, shape, dtype), what in runtime.decisions().items()}
    for m in modes:
        a, b = unpatched[m], patched[m]
        # every patched run against the unpatched runs: on a GPU whose ops are not
        # deterministic (MLX's MoE blocks on CUDA) the unpatched runs part from each other,
        # and each patched run must follow one of them further than any two of them follow
        # each other (so past the last parting it agrees with a run the unpatched model made)
        parts = [divergence_from(a["tokens_each"], t) for t in b["tokens_each"]]
        div = min((p for p in parts if p is not None), default=None)
        ref = reference_divergence(a["tokens_each"])
        forced = both[m]["teacher_forced"]
        entry = {"unpatched": a, "patched": b, "tokens_identical": div is None, "first_divergence": div,
                 "reference_divergence": ref,
                 "within_reference_variation": div is not None and ref is not None and div > ref,
                 "teacher_forced": forced,
                 "teacher_forced_random": both[m]["teacher_forced_random"],
                 # why greedy tokens parted (reported; the tokens still differ, so unless the
                 # unpatched runs part as far, the verdict is a failure)
                 "parting": _parting(div, forced),
                 "prefill_speedup": b["prefill_tps"] / a["prefill_tps"],
                 "decode_speedup": (b["decode_tps"] / a["decode_tps"]) if a["decode_tps"] and b["decode_tps"] else None}
        if result.get("decode_limit_tps") and b["decode_tps"]:
            entry["patched_decode_of_limit"] = b["decode_tps"] / result["decode_limit_tps"]
            entry["unpatched_decode_of_limit"] = a["decode_tps"] / result["decode_limit_tps"]
        result["modes"][m] = entry
    # greedy tokens decide (a near tie still fails: the issue is the user's tokens), and the
    # logits must agree within rounding even where the tokens do
    result["ok"] = all((e["tokens_identical"] or e["within_reference_variation"]) and e["teacher_forced"]["ok"]
                       and e["teacher_forced_random"]["ok"] for e in result["modes"].values())
    return result


def summary(result: dict) -> str:
    """The lines `hlh_mlx validate` prints."""
    m = result["model"]
    q = f"{m['bits']}-bit g{m['group_size']}" if m.get("group_size") else "unquantized"
    lines = [f"{m['source']} ({q}) on {result['device']} [{result['backend']}], MLX {result['mlx']}, "
             f"mlx-lm {result['mlx_lm']}, {result['date']}: prompt {result['prompt_tokens']}, "
             f"{result['max_tokens']} tokens, median of {result['repeats']}"]
    for mode, e in result["modes"].items():
        a, b = e["unpatched"], e["patched"]
        dec = (f"decode {_f(a['decode_tps'])} -> {_f(b['decode_tps'])} tok/s ({_x(e['decode_speedup'])})")
        lines.append(f"  {mode:10s}  prefill {_f(a['prefill_tps'])} -> {_f(b['prefill_tps'])} tok/s "
                     f"({_x(e['prefill_speedup'])}), {dec}, tokens "
                     + ("identical" if e["tokens_identical"] else f"DIVERGE at position {e['first_divergence']}"))
        if e.get("within_reference_variation"):
            lines.append(f"              within the unpatched model's own variation: its repeats part from each "
                         f"other up to position {e['reference_divergence']}, and every patched run follows one "
                         "of them further (this device's ops are not deterministic)")
        f = e.get("teacher_forced")
        if f:
            lines.append(_forced_line("fed the same tokens", f))
            if e.get("parting"):
                lines.append(f"              at the parting ({e['first_divergence']}): {PARTING_NOTE[e['parting']]}")
        if e.get("teacher_forced_random"):
            lines.append(_forced_line("fed random tokens", e["teacher_forced_random"]))
        distinct = a.get("distinct_tokens")
        if distinct is not None and distinct < min(FEW_DISTINCT, len(a["tokens"])):
            lines.append(f"              the greedy tokens are {distinct} distinct of {len(a['tokens'])} (random weights "
                         "repeating themselves): their agreement says little; the logits fed random tokens carry the check")
        ranges = [e[side].get("decode_tps_each") or [] for side in ("unpatched", "patched")]
        if all(len(r) > 1 for r in ranges):
            (a_lo, a_hi), (b_lo, b_hi) = [(min(r), max(r)) for r in ranges]
            overlap = " (the ranges overlap: within run-to-run noise)" if b_lo <= a_hi and a_lo <= b_hi else ""
            lines.append(f"              decode runs {a_lo:.1f}-{a_hi:.1f} -> {b_lo:.1f}-{b_hi:.1f} tok/s{overlap}")
        unsteady = [side for side in ("unpatched", "patched") if not e[side].get("repeats_agree", True)]
        if unsteady:  # then a divergence may be a near-tied logit flipping, not a wrong kernel
            lines.append(f"              the {' and '.join(unsteady)} side{'s' if len(unsteady) > 1 else ''} did not "
                         "repeat {} own tokens across repeats (near-tied logits)".format(
                             "their" if len(unsteady) > 1 else "its"))
        if "patched_decode_of_limit" in e:
            lines.append(f"              decode at {100 * e['unpatched_decode_of_limit']:.0f}% -> "
                         f"{100 * e['patched_decode_of_limit']:.0f}% of the weight-read limit "
                         f"({result['decode_limit_tps']:.0f} tok/s)")
    ref = result.get("rounding_reference")
    if ref:
        lines.append(f"  for scale: the unpatched model uncompiled against compiled, fed the same tokens, differs by up to "
                     f"{100 * ref['max_relative_delta']:.3g}% (rounding in another order, MLX alone)")
    p = result["patch"]
    builtin = sum(1 for what in result["decisions"].values() if what.startswith("built-in"))
    lines.append(f"  patch: replaced {len(p['replaced'])}, kept {len(p['kept'])}; of {len(result['decisions'])} "
                 f"distinct tuned calls, {builtin} run the built-in (`hlh_mlx tune` sweeps them)")
    return "\n".join(lines)


FEW_DISTINCT = 8  # greedy runs with fewer distinct tokens than this get the note above


def _forced_line(label: str, f: dict) -> str:
    """One teacher-forced comparison (`compare_logits`) as `summary` prints it."""
    flips = f["argmax_flips"]
    return (f"              {label}: logits differ by up to {100 * f['max_relative_delta']:.3g}% "
            f"of their largest (tolerance {100 * f['tolerance']:.3g}%" + ("" if f["ok"] else ": OUTSIDE it") + "), "
            + ("the same argmax everywhere" if not flips else
               f"argmax flips at {len(flips)} position(s) ("
               + ", ".join(f"{x['position']}: top-two gap {x['gap']:.3g}" for x in flips[:4])
               + (" ..." if len(flips) > 4 else "") + ")"))


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def random_prompt(model, about: dict, tokens: int, seed: int = 0) -> list[int]:
    """`tokens` token ids drawn uniformly (seeded) from the model's vocabulary: the prompt for
    a model with random weights, where no text would mean more."""
    return np.random.default_rng(seed).integers(0, _vocab(model, about), tokens).tolist()


def _vocab(model, about) -> int:
    v = about["config"].get("vocab_size") or getattr(getattr(model, "args", None), "vocab_size", None)
    if not v:
        raise models.ModelError(f"{about['source']}: config.json has no vocab_size")
    return int(v)


def _mlx_lm_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("mlx-lm")
    except Exception:  # not installed as a distribution (a source checkout)
        return None

