"""Real mlx-lm model classes end to end on tiny configs: `hlh_mlx validate` (tokens of the
unpatched and patched model compared, rates and JSON written), `hlh_mlx tune` (the model's
own calls recorded and swept, resumable) and checkpoint loading."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from hlh_mlx import blocks, models, model_tune, patching, runtime, tuned
from hlh_mlx import validate as validate_mod
from hlh_mlx.cli import main

FAST = ["--tokens", "4", "--prompt-tokens", "6", "--repeats", "1"]


@pytest.fixture(autouse=True)
def fresh(store_dir):
    tuned.refresh()
    yield
    tuned.refresh()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen2-moe", "tiny-mixtral"])
def test_validate_each_family(name, tmp_path):
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["validate", name, *FAST, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "tokens identical" in r.output and f"written: {out}" in r.output
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"uncompiled", "compiled"} and data["ok"]
    for mode in data["modes"].values():
        assert len(mode["patched"]["tokens"]) == 4 and mode["patched"]["tokens"] == mode["unpatched"]["tokens"]
        assert mode["patched"]["decode_tps"] > 0 and mode["prefill_speedup"] > 0
    assert data["device"] and data["mlx"] == mx.__version__ and data["date"]
    assert data["patch"]["replaced"], "nothing was patched"
    # fed the same tokens: the patched logits and, for scale, MLX's own compiled against uncompiled
    for mode in data["modes"].values():
        assert mode["teacher_forced"]["ok"] and mode["teacher_forced"]["max_relative_delta"] < 5e-2
        # and fed random tokens: one logit row per token, compared
        probe = mode["teacher_forced_random"]
        assert probe["ok"] and 0 <= probe["max_relative_delta"] < 5e-2
        assert mode["unpatched"]["distinct_tokens"] == len(set(mode["unpatched"]["tokens"]))
    ref = data["rounding_reference"]
    assert ref["ok"] and 0 <= ref["max_relative_delta"] < 5e-2
    assert "for scale: the unpatched model uncompiled against compiled" in r.output


def test_validate_fails_on_diverging_tokens(tmp_path, monkeypatch):
    def bad_patch(model):  # a "patch" that changes what the model computes
        report = patching.PatchReport()
        norm = model.model.norm
        wrong = type(norm)(norm.weight.shape[0], eps=norm.eps)
        wrong.weight = -norm.weight
        report.swap(model.model, "norm", wrong)
        return report
    monkeypatch.setattr(validate_mod.patching, "patch", bad_patch)
    r = CliRunner().invoke(main, ["validate", "tiny-llama", *FAST, "--mode", "uncompiled", "--json",
                                  str(tmp_path / "v.json")])
    assert r.exit_code == 1
    assert "DIVERGE at position 0" in r.output and "uncompiled: tokens part at position 0 (" in r.output
    # fed the same tokens, the logits say it is no near tie: the negated norm flips their sign
    assert "uncompiled: teacher-forced logits differ by 200% of their largest (tolerance 5%)" in r.output
    assert "logits differ by up to 200% of their largest (tolerance 5%: OUTSIDE it)" in r.output
    assert "at the parting (0): fed the same tokens, the logits differ beyond rounding" in r.output
    assert "near tie" not in r.output
    # fed random tokens too
    assert "uncompiled: teacher-forced logits (random tokens) differ by 200% of their largest" in r.output
    assert "fed random tokens: logits differ by up to 200% of their largest (tolerance 5%: OUTSIDE it)" in r.output


def test_validate_checks_random_tokens_where_the_greedy_ones_repeat(monkeypatch):
    """A random-weight model that repeats one token: a kernel wrong only for other tokens
    leaves the greedy tokens and the logits fed them alone; fed random tokens, it is caught.
    Here the "patch" adds a wrong embedding row for every token but the repeated one."""
    from hlh_mlx.validate import Run
    repeated = 5

    real_prompt = validate_mod.random_prompt

    def one_token(model, prompt, max_tokens):
        return Run([repeated] * max_tokens, 0.01, 0.01)

    def prompt_of_it(model, about, tokens, seed=0):  # the prompt repeats it too; the probe is random
        return [repeated] * tokens if seed == 0 else real_prompt(model, about, tokens, seed)

    def bad_patch(model):  # every other token looks up its neighbour's embedding
        report = patching.PatchReport()
        emb = model.model.embed_tokens
        wrong = type(emb)(*emb.weight.shape)
        rolled = mx.roll(emb.weight, 1, axis=0)
        wrong.weight = mx.concatenate([rolled[:repeated], emb.weight[repeated:repeated + 1], rolled[repeated + 1:]])
        report.swap(model.model, "embed_tokens", wrong)
        return report
    monkeypatch.setattr(validate_mod, "generate", one_token)
    monkeypatch.setattr(validate_mod, "random_prompt", prompt_of_it)
    monkeypatch.setattr(validate_mod.patching, "patch", bad_patch)
    result = validate_mod.validate("tiny-llama", bits=16, max_tokens=6, prompt_tokens=1, repeats=1,
                                   modes=("uncompiled",))
    e = result["modes"]["uncompiled"]
    assert e["tokens_identical"] and e["teacher_forced"]["ok"]  # what the greedy tokens alone show
    assert not e["teacher_forced_random"]["ok"] and not result["ok"]
    text = validate_mod.summary(result)
    assert "the greedy tokens are 1 distinct of 6" in text and "fed random tokens:" in text


def test_logit_comparison_tells_a_near_tie_from_a_wrong_kernel():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 50)).astype(np.float32) * 10
    ref[3, :2] = [30.0, 30.001]  # position 3: a near tie between tokens 0 and 1
    rounded = ref + rng.uniform(-0.01, 0.01, ref.shape).astype(np.float32)
    rounded[3, :2] = [30.004, 29.999]  # the rounding flips the tie
    near = validate_mod.compare_logits(ref, rounded, 1e-3)
    assert near["ok"] and [f["position"] for f in near["argmax_flips"]] == [3]
    assert near["argmax_flips"][0]["gap"] == pytest.approx(0.001, abs=1e-4)
    assert near["max_relative_delta"] < 1e-3
    wrong = validate_mod.compare_logits(ref, ref[:, ::-1].copy(), 1e-3)  # another computation
    assert not wrong["ok"] and wrong["max_relative_delta"] > 0.1
    assert validate_mod.compare_logits(ref, ref, 0.0)["ok"]  # identical: within any tolerance

    # why greedy tokens parted at a position, from the comparison fed the same tokens
    parting = validate_mod._parting
    assert parting(None, near) is None
    assert parting(3, near) == "near tie"            # the argmaxes flip right there
    assert parting(2, near) == "not reproduced"      # fed the same tokens they agree there
    assert parting(3, wrong) == "logits differ"      # beyond rounding: never called a tie


@pytest.mark.parametrize("name,slot", [("tiny-qwen2-moe", "mlp"), ("tiny-mixtral", "block_sparse_moe")])
def test_patch_keeps_parameter_names_and_reports_expert_mlps(name, slot):
    model, _ = models.load(name, bits=4)
    before = {k: v.shape for k, v in tree_flatten(model.parameters())}
    report = patching.patch(model)
    assert all(isinstance(b, blocks.DecoderBlock) for b in model.model.layers), report
    assert {k: v.shape for k, v in tree_flatten(model.parameters())} == before  # checkpoints load unchanged
    kept = {p: why for p, _, why in report.kept}
    assert f"model.layers.0.{slot}.switch_mlp" in kept and "expert" in kept[f"model.layers.0.{slot}.switch_mlp"]


def test_decode_bytes_count_what_one_token_reads():
    """The weight-read limit of a decode step: one row of an embedding table the step only
    looks up (the whole table where it is also the output head), and of stacked experts the
    top-k a token runs; every other parameter whole."""
    def nbytes(model, keep):
        return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if keep(k))
    llama, _ = models.load("tiny-llama", bits=4)
    emb = nbytes(llama, lambda k: k.startswith("model.embed_tokens."))
    assert models.decode_bytes(llama) == models.weight_bytes(llama) - emb + emb // 211  # vocab 211
    tied, _ = models.load("tiny-qwen3", bits=4)  # tie_word_embeddings: the head reads the table
    assert not hasattr(tied, "lm_head") and models.decode_bytes(tied) == models.weight_bytes(tied)
    moe_model, _ = models.load("tiny-qwen2-moe", bits=4)  # 4 experts, 2 per token
    experts = nbytes(moe_model, lambda k: ".switch_mlp." in k)
    emb = nbytes(moe_model, lambda k: k.startswith("model.embed_tokens."))
    assert models.decode_bytes(moe_model) == models.weight_bytes(moe_model) - emb + emb // 211 - experts // 2


@pytest.mark.parametrize("family", ["deepseek", "gpt_oss"])
def test_decode_bytes_find_experts_and_their_count_wherever_a_family_keeps_them(family):
    """DeepSeek keeps top-k on its router, gpt-oss its experts under `experts`: both stacks
    are mlx-lm SwitchLinear layers, found by type; 8 experts, 2 a token."""
    import importlib
    arch = importlib.import_module(f"mlx_lm.models.{family}")
    common = dict(model_type=family, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=2)
    extra = {"deepseek": dict(moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=8),
             "gpt_oss": dict(num_local_experts=8, head_dim=16, rms_norm_eps=1e-5, sliding_window=16,
                             rope_theta=10000.0, rope_scaling=None,
                             layer_types=["sliding_attention", "full_attention"])}[family]
    args = arch.ModelArgs.from_dict({**common, **extra})
    model = arch.Model(args)
    switch = {p for p, m in model.named_modules() if type(m).__name__ == "SwitchLinear"}
    experts = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.rpartition(".")[0] in switch)
    emb = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith("model.embed_tokens."))
    assert switch and experts
    assert models.decode_bytes(model) == models.weight_bytes(model) - emb + emb // 64 - experts + experts // 4


def test_checkpoint_directory_round_trip(tmp_path):
    model, about = models.load("tiny-llama", bits=4, seed=3)
    path = models.save(model, about, tmp_path / "ck")
    loaded, about2 = models.load(str(path))
    assert about2["bits"] == 4 and about2["group_size"] == 64 and not about2["random_weights"]
    x = mx.array([[5, 7, 11]])
    assert mx.array_equal(loaded(x), model(x))
    r = CliRunner().invoke(main, ["validate", str(path), *FAST, "--mode", "uncompiled", "--json",
                                  str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown model 'nope'"),
    (["./no/such/dir"], "no such directory"),
    (["tiny-llama", "--bits", "3"], "'3' is not one of"),
])
def test_bad_models_are_one_line_errors(args, message, tmp_path):
    r = CliRunner().invoke(main, ["validate", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no config.json" in r.output


def test_tune_sweeps_the_calls_the_model_makes_and_resumes(store_dir):
    model, _ = models.load("tiny-llama", bits=4)
    result = model_tune.tune(model, prompt_tokens=6, budget=1, notify=lambda m: None)
    calls = {(op, "x".join(map(str, s.values())), d) for op, s, d in result.calls}
    # decode: 4-bit gemvs at one token, gate and up fused with SwiGLU; the norms (the second one
    # fused with the residual add) at the prefill's 5 rows and at 1
    assert ("qgemv", "128x128x64", "float16") in calls and ("qgemv", "128x256x64", "float16") in calls
    assert ("qgemv_swiglu", "256x128x64", "float16") in calls and ("qgemv", "256x128x64", "float16") not in calls
    assert ("rms_norm", "5x128", "float16") in calls and ("rms_norm", "1x128", "float16") in calls
    assert ("add_rms_norm", "5x128", "float16") in calls and ("add_rms_norm", "1x128", "float16") in calls
    # the prefill's 4-bit projections, 5 rows each: qmm's (one token's are qgemv's)
    assert {("qmm", "5x128x128x64", "float16"), ("qmm", "5x256x128x64", "float16"),
            ("qmm", "5x128x256x64", "float16")} <= calls
    # the fused decoder ops the blocks weigh against their separate calls: tuned too, so a
    # device with none of them stored gets them from one `tune`
    assert {("norm_qkv_rope", "128x64x128x64x32x0", "float16"), ("qgemv_add", "128x128x64", "float16"),
            ("qgemv_add", "128x256x64", "float16"), ("norm_qgemv_swiglu", "256x128x64", "float16")} <= calls
    assert {(op, s, d) for op, s, d, ok, bad in result.swept} == calls
    assert all(ok == 1 and bad == 0 for *_, ok, bad in result.swept)
    assert set(result.decisions) == {f"{op} {s} {d}" for op, s, d in calls}
    stored = {p.name: p.read_text() for p in store_dir.rglob("*.jsonl")}
    assert {"qgemv.jsonl", "qgemv_swiglu.jsonl", "rms_norm.jsonl", "add_rms_norm.jsonl", "rope.jsonl"} <= set(stored)
    # a second tune (an interrupted one run again) finds every variant done: nothing re-run
    model_tune.tune(model, prompt_tokens=6, budget=1, notify=lambda m: None)
    assert {p.name: p.read_text() for p in store_dir.rglob("*.jsonl")} == stored


def test_recording_sees_decode_and_prefill_calls():
    model, _ = models.load("tiny-qwen3", bits=16)
    patching.patch(model)
    calls = model_tune.record_calls(model, prompt_tokens=9)
    ops_seen = {op for op, _, _ in calls}
    assert {"rms_norm", "rope", "swiglu"} <= ops_seen
    rows = {s["R"] for op, s, _ in calls if op == "rms_norm" and s["C"] == 128}
    assert rows == {8, 1}  # mlx-lm prefills all but the last prompt token, then steps one at a time
    assert runtime.decided_calls() == calls


def test_tune_command_shows_progress_and_the_result(store_dir):
    r = CliRunner().invoke(main, ["tune", "tiny-qwen3", "--layers", "1", "--prompt-tokens", "6", "--budget", "1"])
    assert r.exit_code == 0, r.output
    assert "what the patched model runs now:" in r.output and "distinct tuned call(s)" in r.output
    assert re.search(r"recorded, swept and decided in \d+ s", r.output)
    assert "qgemv_swiglu float16 at 256x128x64: 1/1 (100%)" in r.output  # progress when piped, per sweep
    # Qwen3's attention input: the projections, then the heads' norms and RoPE, each swept
    assert "norm_qkv_rope float16 at 128x64x128x64x32x0: 1/1 (100%)" in r.output
    assert "qk_norm_rope float16 at 128x64x32: 1/1 (100%)" in r.output
    (store_dir.parent / "ck").mkdir()
    (store_dir.parent / "ck" / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["validate", str(store_dir.parent / "ck"), "--bits", "4"])
    assert r.exit_code == 2 and "bits apply to named configs" in r.output


def test_summary_says_when_a_side_did_not_repeat_its_own_tokens():
    side = {"prefill_tps": 10.0, "decode_tps": 5.0, "repeats_agree": True}
    result = {"model": {"source": "m", "bits": 4, "group_size": 64}, "device": "d", "backend": "cuda",
              "mlx": "0", "mlx_lm": "0", "date": "today", "prompt_tokens": 8, "max_tokens": 4, "repeats": 3,
              "modes": {"uncompiled": {"unpatched": {**side, "repeats_agree": False}, "patched": side,
                                       "tokens_identical": False, "first_divergence": 2,
                                       "prefill_speedup": 1.0, "decode_speedup": 1.0},
                        "compiled": {"unpatched": side, "patched": side, "tokens_identical": True,
                                     "first_divergence": None, "prefill_speedup": 1.0, "decode_speedup": 1.0}},
              "patch": {"replaced": [], "kept": []}, "decisions": {}}
    text = validate_mod.summary(result)
    assert "DIVERGE at position 2" in text
    assert text.count("did not repeat") == 1 and "the unpatched side did not repeat its own tokens" in text


def _modules_by_path(model):
    return {path: id(m) for path, m in model.named_modules()}


def test_unpatched_puts_back_every_original_layer_and_patches_again():
    model, _ = models.load("tiny-llama", bits=4)
    before = _modules_by_path(model)
    x = mx.array([[1, 2, 3]])
    want = model(x)
    report = patching.patch(model)
    after = _modules_by_path(model)
    assert after != before and report.swaps
    with report.unpatched():
        assert _modules_by_path(model) == before  # the same objects, nested ones included
        assert mx.array_equal(model(x), want).item()
    assert _modules_by_path(model) == after


def test_validate_alternates_the_sides(monkeypatch):
    order = []
    real = validate_mod.generate

    def spy(model, prompt, max_tokens):
        patched = any(isinstance(m, blocks.DecoderBlock) for m in validate_mod.decoder_blocks(model))
        order.append(("P" if patched else "U") if max_tokens > 4 else "w")
        return real(model, prompt, max_tokens)
    monkeypatch.setattr(validate_mod, "generate", spy)
    validate_mod.validate("tiny-llama", bits=4, max_tokens=5, prompt_tokens=3, repeats=3, modes=("uncompiled",))
    assert order == ["w", "w", "U", "P", "P", "U", "U", "P"]


def test_summary_shows_each_sides_range_and_says_when_they_overlap():
    def side(each):
        return {"prefill_tps": 10.0, "decode_tps": sorted(each)[len(each) // 2], "repeats_agree": True,
                "decode_tps_each": each}
    mode = {"tokens_identical": True, "first_divergence": None, "prefill_speedup": 1.0, "decode_speedup": 1.1}
    result = {"model": {"source": "m", "bits": 4, "group_size": 64}, "device": "d", "backend": "cuda",
              "mlx": "0", "mlx_lm": "0", "date": "today", "prompt_tokens": 8, "max_tokens": 4, "repeats": 3,
              "modes": {"uncompiled": {**mode, "unpatched": side([139.0, 169.0, 145.0]),
                                       "patched": side([130.0, 183.0, 151.0])},
                        "compiled": {**mode, "unpatched": side([100.0, 104.0, 102.0]),
                                     "patched": side([150.0, 155.0, 152.0])}},
              "patch": {"replaced": [], "kept": []}, "decisions": {}}
    lines = validate_mod.summary(result).splitlines()
    ranges = [ln for ln in lines if "decode runs" in ln]
    assert ranges[0].strip() == "decode runs 139.0-169.0 -> 130.0-183.0 tok/s (the ranges overlap: within run-to-run noise)"
    assert ranges[1].strip() == "decode runs 100.0-104.0 -> 150.0-155.0 tok/s"


def test_compiled_blocks_wrap_the_layers_each_side_has():
    """An unquantized block is kept and its layers patched inside it: alternating the sides
    under compiled_blocks must give each side a wrapper with that side's own layers."""
    model, _ = models.load("tiny-llama", bits=16)
    report = patching.patch(model)
    block = validate_mod.decoder_blocks(model)[0]
    assert not isinstance(block, blocks.DecoderBlock)  # kept, its layers patched
    patched_mlp = block.mlp
    wrappers: dict = {}
    for _ in range(2):
        with report.unpatched():
            original_mlp = block.mlp
            with validate_mod.compiled_blocks(model, wrappers):
                assert validate_mod.decoder_blocks(model)[0]["mlp"] is original_mlp
        with validate_mod.compiled_blocks(model, wrappers):
            assert validate_mod.decoder_blocks(model)[0]["mlp"] is patched_mlp
    # one wrapper per block and side, made once however often the sides alternate
    assert original_mlp is not patched_mlp and len(wrappers) == 2 * len(validate_mod.decoder_blocks(model))


def test_a_divergence_within_the_unpatched_models_own_variation_passes_and_says_so():
    """On a GPU whose ops are not deterministic the unpatched runs part from each other: a
    patched run must follow one of them further than any two of them follow each other."""
    u = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 7, 7], [1, 2, 3, 4, 9, 9]]  # pairs part at 3, 4 and 3
    assert validate_mod.self_divergence(u) == 3 and validate_mod.reference_divergence(u) == 4
    assert validate_mod.reference_divergence([*u, u[0]]) is None  # two identical runs: no licence
    assert validate_mod.reference_divergence(u[:1]) is None
    assert validate_mod.divergence_from(u, [1, 2, 3, 7, 7, 7]) is None  # equals one unpatched run
    assert validate_mod.divergence_from(u, [1, 2, 3, 4, 9, 5]) == 5      # leaves the closest run at 5
    assert validate_mod.divergence_from(u, [1, 7, 3, 4, 5, 6]) == 1


def test_validate_passes_a_divergence_the_unpatched_side_shows_itself_and_fails_an_earlier_one(monkeypatch):
    """`validate`'s verdict from made-up runs: patched runs that follow an unpatched run past
    the last position where the unpatched runs part pass (and the summary says why); one that
    leaves them there, with a token none of them made, or earlier fails."""
    from hlh_mlx.validate import Run
    unpatched = iter([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 7, 7], [1, 2, 3, 4, 9, 9]] * 4)

    def fake_generate(patched_tokens):
        def generate(model, prompt, max_tokens):
            patched = any(isinstance(m, blocks.DecoderBlock) for m in validate_mod.decoder_blocks(model))
            if max_tokens <= 4:
                return Run([1, 2, 3, 4][:max_tokens], 0.1, 0.1)
            return Run(list(patched_tokens if patched else next(unpatched)), 0.1, 0.1)
        return generate
    for patched_tokens, div, ok in (([1, 2, 3, 4, 9, 5], 5, True), ([1, 2, 3, 4, 6, 6], 4, False),
                                    ([1, 2, 3, 6, 5, 6], 3, False)):  # every patched run alike
        monkeypatch.setattr(validate_mod, "generate", fake_generate(patched_tokens))
        result = validate_mod.validate("tiny-llama", bits=4, max_tokens=6, prompt_tokens=3, repeats=3,
                                       modes=("uncompiled",))
        e = result["modes"]["uncompiled"]
        assert result["ok"] is ok and e["reference_divergence"] == 4 and not e["tokens_identical"]
        assert e["first_divergence"] == div and e["within_reference_variation"] is ok
        assert ("within the unpatched model's own variation" in validate_mod.summary(result)) is ok


def test_every_patched_run_is_held_to_the_unpatched_runs_not_only_the_first(monkeypatch):
    from hlh_mlx.validate import Run
    runs = {"U": iter([[1, 2, 3, 4, 5]] * 3), "P": iter([[1, 2, 3, 4, 5], [1, 2, 7, 4, 5], [1, 2, 3, 4, 5]])}

    def generate(model, prompt, max_tokens):
        patched = any(isinstance(m, blocks.DecoderBlock) for m in validate_mod.decoder_blocks(model))
        if max_tokens <= 4:
            return Run([1, 2, 3, 4][:max_tokens], 0.1, 0.1)
        return Run(list(next(runs["P" if patched else "U"])), 0.1, 0.1)
    monkeypatch.setattr(validate_mod, "generate", generate)
    result = validate_mod.validate("tiny-llama", bits=4, max_tokens=5, prompt_tokens=3, repeats=3, modes=("uncompiled",))
    e = result["modes"]["uncompiled"]
    assert not result["ok"] and e["first_divergence"] == 2 and e["reference_divergence"] is None


def test_teacher_forcing_prefills_in_chunks_as_mlx_lm_does(monkeypatch):
    """A prompt longer than one prefill step goes in chunk by chunk (as generate_step feeds
    it) and every token of it reaches the cache: the logits equal those of one prefill."""
    model, _ = models.load("tiny-llama", bits=4, dtype="float32")
    prompt, tokens = [5, 9, 2, 7, 7, 1, 3], [4, 8, 6]
    whole = validate_mod.forced_logits(model, prompt, tokens)
    monkeypatch.setattr(validate_mod, "PREFILL_STEP", 2)  # chunks of 2, 2, 2 for prompt[:-1]
    chunked = validate_mod.forced_logits(model, prompt, tokens)
    assert whole.shape == chunked.shape == (3, 211)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    dropped = validate_mod.forced_logits(model, prompt[1:], tokens)  # a prompt token short: not the same
    assert np.max(np.abs(dropped - whole)) > 1e-3


def test_tune_counts_variants_not_the_second_timings_that_end_a_sweep():
    s, other = {"N": 8, "K": 64, "G": 64}, {"N": 16, "K": 64, "G": 64}
    recs = [{"variant_id": "a", "shape": s, "template": "t", "correct": True},
            {"variant_id": "b", "shape": s, "template": "t", "correct": False, "status": "crashed"},
            {"variant_id": "b", "shape": s, "template": "t", "correct": False, "status": "crashed"},
            {"variant_id": "c", "shape": s, "template": "t", "correct": False, "status": "crashed"},
            {"variant_id": "c", "shape": s, "template": "t", "correct": True},   # its rerun passed
            {"variant_id": None, "shape": s, "template": "builtin", "correct": True},
            {"variant_id": None, "shape": s, "template": "builtin", "correct": False, "repeat": True},
            {"variant_id": "a", "shape": s, "template": "t", "correct": False, "repeat": True},
            {"variant_id": "d", "shape": other, "template": "t", "correct": True}]
    assert model_tune.tally(recs, s) == (2, 1)
    assert model_tune.tally(recs, other) == (1, 0)
