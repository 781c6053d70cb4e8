"""Models to tune and validate on: a local mlx-lm checkpoint, or a published config built
through mlx-lm's own model classes with random weights (no download needed).

    model, about = models.load("path/to/checkpoint")       # config.json + *.safetensors
    model, about = models.load("llama-3-8b", bits=4)        # a named config, random weights

Named configs copy the published sizes of each family; `layers=` keeps fewer decoder
blocks (same per-block shapes) and the `tiny-*` ones run anywhere in seconds (tests).
Random weights are quantized the way mlx-lm converts a checkpoint (its `quantize_model`:
every Linear and Embedding whose width the group size divides, with the model's own
`quant_predicate`, e.g. 8-bit router gates for Qwen3-MoE)."""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

# model_type -> the published sizes (config.json fields mlx-lm's ModelArgs read)
CONFIGS = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=8192),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     max_position_embeddings=40960),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24,
                              intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                              num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          tie_word_embeddings=False, max_position_embeddings=40960),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False),
    # the same classes at sizes a CPU runs in a second (tests, CI)
    "tiny-llama": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=211, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=211, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=211,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       max_position_embeddings=4096),
    "tiny-qwen2-moe": dict(model_type="qwen2_moe", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=4,
                           num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=211,
                           rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                           moe_intermediate_size=128, num_experts=6, num_experts_per_tok=3, decoder_sparse_step=1,
                           mlp_only_layers=[], norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, vocab_size=211, rms_norm_eps=1e-6, rope_theta=1000000.0,
                           tie_word_embeddings=False, max_position_embeddings=4096),
    "tiny-mixtral": dict(model_type="mixtral", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                         num_local_experts=5, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=211, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False),
}

BITS = (4, 8, 16)
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class ModelError(ValueError):
    """A model source that cannot be loaded, said in one line."""


def _classes(model_type: str):
    try:
        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "mlx_lm":
            if e.name == "mlx_lm":
                raise ModelError("models need mlx-lm: pip install 'hlh-mlx[lm]'") from None
            raise ModelError(f"mlx-lm has no model type {model_type!r}") from None
        raise
    return arch.Model, arch.ModelArgs


def build(name: str, *, bits: int = 4, group_size: int = 64, dtype: str = "float16", layers: int | None = None,
          seed: int = 0) -> tuple[nn.Module, dict]:
    """A named config (CONFIGS) through mlx-lm's classes, random weights, quantized to
    `bits` (16: not quantized) as mlx-lm converts a checkpoint."""
    if name not in CONFIGS:
        raise ModelError(f"unknown model {name!r}: a checkpoint directory or one of {', '.join(CONFIGS)}")
    if bits not in BITS:
        raise ModelError(f"bits must be one of {BITS}, not {bits}")
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    config = dict(CONFIGS[name])
    if layers is not None:
        if not 1 <= layers:
            raise ModelError(f"layers must be at least 1, not {layers}")
        config["num_hidden_layers"] = layers
    model_cls, args_cls = _classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(DTYPES[dtype])
    if bits != 16:
        config = _quantize(model, config, group_size, bits)
    mx.eval(model.parameters())
    model.eval()
    return model, {"source": name, "config": config, "bits": bits, "group_size": group_size if bits != 16 else None,
                   "dtype": dtype, "random_weights": True}


def _quantize(model, config: dict, group_size: int, bits: int) -> dict:
    """Quantize as `mlx_lm.convert` does (its quantize_model: the model's own quant_predicate
    included, e.g. Qwen3-MoE's 8-bit router gates); the config as it records it."""
    import contextlib
    import io

    from mlx_lm.utils import quantize_model
    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized model with ..." line
        _, config = quantize_model(model, config, group_size, bits)
    config.pop("quantization_config", None)  # the Hugging Face alias of "quantization"
    return config


def load(source: str, *, seed: int = 0, **kwargs) -> tuple[nn.Module, dict]:
    """A checkpoint directory (mlx-lm's layout: config.json and model*.safetensors) or a
    named config (see `build`, which takes the keyword arguments and the seed)."""
    path = Path(source)
    if path.is_dir():
        given = sorted(k for k, v in kwargs.items() if v is not None)
        if given:
            raise ModelError(f"{source}: {', '.join(given)} apply to named configs; a checkpoint loads as saved")
        if not (path / "config.json").is_file():
            raise ModelError(f"{source}: no config.json (an mlx-lm checkpoint directory has config.json and "
                             "model*.safetensors)")
        try:
            from mlx_lm.utils import load_model
        except ModuleNotFoundError:
            raise ModelError("models need mlx-lm: pip install 'hlh-mlx[lm]'") from None
        try:
            model, config = load_model(path)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ModelError(f"{source}: {e}") from None
        model.eval()
        q = config.get("quantization") or {}
        return model, {"source": str(path), "config": config, "bits": q.get("bits", 16),
                       "group_size": q.get("group_size"), "random_weights": False}
    if "/" in source or source.startswith("."):
        raise ModelError(f"{source}: no such directory (give a checkpoint directory or one of {', '.join(CONFIGS)})")
    return build(source, seed=seed, **{k: v for k, v in kwargs.items() if v is not None})


def save(model: nn.Module, about: dict, path: str | Path) -> Path:
    """Write a checkpoint directory mlx-lm (and `load`) reads: config.json and
    model.safetensors."""
    import json
    from mlx.utils import tree_flatten
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(about["config"], indent=2))
    return path


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter."""
    from mlx.utils import tree_flatten
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode_bytes(model: nn.Module) -> int:
    """Bytes of parameters one decode step of one token reads at least: every parameter but
    the rows of an embedding table the step only looks up (one row; the whole table where
    the output head is that table: mlx-lm models without an `lm_head`), and of stacked
    experts (mlx-lm's SwitchLinear layers, whatever the block calls them) the top-k a token
    runs, where the block says how many (else all of them: never a limit set too high)."""
    from mlx.utils import tree_flatten
    modules = dict(model.named_modules())
    tied = not hasattr(model, "lm_head")
    total = 0.0
    for path, v in tree_flatten(model.parameters()):
        owner_path = path.rpartition(".")[0]
        owner = modules.get(owner_path)
        if isinstance(owner, (nn.Embedding, nn.QuantizedEmbedding)) and not tied:
            total += v.nbytes / v.shape[0]  # one row
        elif type(owner).__name__ in _STACKED_EXPERTS:
            k = _experts_per_token(model, modules, owner_path)
            total += v.nbytes * min(k, v.shape[0]) / v.shape[0] if k else v.nbytes  # (experts, ...) stacked
        else:
            total += v.nbytes
    return int(total)


_STACKED_EXPERTS = ("SwitchLinear", "QuantizedSwitchLinear")  # mlx_lm.models.switch_layers
_TOP_K_NAMES = ("num_experts_per_tok", "top_k", "n_activated_experts", "num_activated_experts", "moe_topk")


def _experts_per_token(model, modules: dict, path: str) -> int | None:
    """How many of a stack's experts one token runs: the nearest enclosing module (or its
    router, or the model's config) that names it; None when nothing does."""
    holders = []
    while path:
        path = path.rpartition(".")[0]
        m = modules.get(path)
        holders += [m, getattr(m, "gate", None), getattr(m, "router", None)]
    holders.append(getattr(model, "args", None))
    for holder in holders:
        for name in _TOP_K_NAMES:
            k = getattr(holder, name, None)
            if type(k) is int and k > 0:
                return k
    return None
