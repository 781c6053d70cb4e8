"""Where a prefill's time goes: the whole prefill of an mlx-lm model, unpatched and patched,
beside each op family of one decoder layer timed alone at the prompt's shapes (latency in a
dependent chain, `timing.measure`, inputs rotated through 2 GB as a sweep times them), times
the number of layers.

    python benchmarks/prefill_breakdown.py [--model llama-3-8b] [--bits 4] [--layers 32]
                                           [--prompt-tokens 512] [--out F [--force]]

The prefill is what mlx-lm's generation loop runs before the first token: the prompt but its
last token through the model with a fresh KV cache, the caches evaluated (the logits of those
positions are never read, so the output head does not run). Op families of one layer, at M =
prompt - 1 rows: every quantized (or plain) projection of the block (q, k, v, o, gate, up,
down, as the block holds them), the attention (causal, GQA), the two RMSNorms, RoPE of q and
k, SwiGLU, and the two residual adds. "rest" is the measured prefill less their sum: the
embedding, host time the GPU waits for, and whatever the chain timing of one op alone does
not see (overlap between ops makes it negative).
Writes: a table to stdout; the JSON to F only when --out F is given (an existing F is
refused before anything runs, unless --force).
"""

import argparse
import datetime
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from hlh_mlx import models, patching, paths, timing, validate


def prefill_ms(model, prompt: list[int], repeats: int = 5) -> float:
    """Median milliseconds of one prefill (a fresh cache each time), after a warm-up."""
    from mlx_lm.models.cache import make_prompt_cache
    times = []
    for i in range(repeats + 1):
        cache = make_prompt_cache(model)
        mx.synchronize()
        t = time.perf_counter()
        model(mx.array(prompt[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.synchronize()
        if i:  # the first run builds kernels
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _normal(*shape, dtype):
    return mx.random.normal(shape).astype(dtype)


def layer_cases(model, m: int, dtype) -> dict:
    """{family: [(fn, make)]}: the ops of one decoder layer at m rows; make() gives fn's inputs
    (a projection's weights among them, so they rotate like the activations)."""
    args = model.args
    hidden, inter = args.hidden_size, args.intermediate_size
    heads = args.num_attention_heads
    kv = getattr(args, "num_key_value_heads", None) or heads
    d = getattr(args, "head_dim", None) or hidden // heads
    block = validate.decoder_blocks(model)[0]
    cases: dict = {"projections": [], "attention": [], "rms_norm": [], "rope": [], "swiglu": [], "residual adds": []}
    for _, layer in block.named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            w, s, b, gs, bits = layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits
            k_in = w.shape[1] * 32 // bits

            def qmm(x, w, s, *b, gs=gs, bits=bits):
                return mx.quantized_matmul(x, w, s, b[0] if b else None, transpose=True, group_size=gs, bits=bits)
            cases["projections"].append((qmm, lambda w=w, s=s, b=b, k_in=k_in: [
                _normal(1, m, k_in, dtype=dtype), w, s, *([b] if b is not None else [])]))
        elif isinstance(layer, nn.Linear):
            w = layer["weight"]
            cases["projections"].append((lambda x, w: x @ w.T,
                                         lambda w=w: [_normal(1, m, w.shape[1], dtype=dtype), w]))
    scale = d ** -0.5
    cases["attention"].append((
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
        lambda: [_normal(1, heads, m, d, dtype=dtype), _normal(1, kv, m, d, dtype=dtype), _normal(1, kv, m, d, dtype=dtype)]))
    for _ in range(2):
        cases["rms_norm"].append((lambda x, w: mx.fast.rms_norm(x, w, 1e-5),
                                  lambda: [_normal(1, m, hidden, dtype=dtype), mx.ones((hidden,), dtype=dtype)]))
    for h in (heads, kv):
        cases["rope"].append((lambda x: mx.fast.rope(x, d, traditional=False, base=10000.0, scale=1.0, offset=0),
                              lambda h=h: [_normal(1, h, m, d, dtype=dtype)]))
    cases["swiglu"].append((lambda g, u: nn.silu(g) * u,
                            lambda: [_normal(1, m, inter, dtype=dtype), _normal(1, m, inter, dtype=dtype)]))
    for _ in range(2):
        cases["residual adds"].append((lambda a, b: a + b,
                                       lambda: [_normal(1, m, hidden, dtype=dtype), _normal(1, m, hidden, dtype=dtype)]))
    return cases


def breakdown(model, m: int, dtype, layers: int) -> dict:
    out = {}
    for family, cs in layer_cases(model, m, dtype).items():
        per_layer = sum(timing.chain_ms(fn, make()) for fn, make in cs)
        out[family] = {"per_layer_ms": round(per_layer, 4), "model_ms": round(per_layer * layers, 3)}
    return out


outputs = paths.given_output  # the files this run writes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, about = models.load(args.model, bits=args.bits, **({"layers": args.layers} if args.layers else {}))
    layers = len(validate.decoder_blocks(model))
    prompt = validate.random_prompt(model, about, args.prompt_tokens)
    dtype = patching._dtype_of(model)
    result = {"model": args.model, "bits": args.bits, "layers": layers, "prompt_tokens": args.prompt_tokens,
              "device": str(mx.default_device()), "mlx": mx.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    result["unpatched_prefill_ms"] = prefill_ms(model, prompt)
    result["ops"] = breakdown(model, args.prompt_tokens - 1, dtype, layers)
    patching.patch(model)
    result["patched_prefill_ms"] = prefill_ms(model, prompt)
    summed = sum(v["model_ms"] for v in result["ops"].values())
    result["rest_ms"] = round(result["unpatched_prefill_ms"] - summed, 3)
    total = result["unpatched_prefill_ms"]
    print(f"{args.model} {args.bits}-bit, {layers} layers, prompt {args.prompt_tokens} on {result['device']}, "
          f"MLX {mx.__version__}: prefill {total:.2f} ms unpatched, {result['patched_prefill_ms']:.2f} ms patched")
    print(f"{'op family (one layer alone, chained) x layers':48s} {'ms':>9s} {'share':>7s}")
    for family, v in result["ops"].items():
        print(f"  {family:46s} {v['model_ms']:9.2f} {100 * v['model_ms'] / total:6.1f}%")
    print(f"  {'rest (embedding, host, overlap)':46s} {result['rest_ms']:9.2f} {100 * result['rest_ms'] / total:6.1f}%")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
