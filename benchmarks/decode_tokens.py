"""Tokens/s of a greedy decode loop before and after `hlh_mlx.patch(model)`.

    python benchmarks/decode_tokens.py [--layers 4] [--bits 4|16] [--tokens 64] [--small] [--out F [--force]]

Writes: the result as JSON to stdout, and to F only when --out F (or --json F) is given;
an existing F is refused before the model is built, unless --force.

Each side runs four ways: uncompiled and compiled (the block's projections, norms and MLP
through mx.compile, the offset-dependent attention outside it), each synchronous (evaluate
every token before building the next) and pipelined like mlx-lm's loop (build token n+1
while the GPU runs token n, mx.async_eval). Both sides are run the same way in each mode.

The model is a Llama-style decoder written with mlx.nn layers (RMSNorm, Linear or
QuantizedLinear, RoPE, a gate/up/down MLP, GQA attention through
mx.fast.scaled_dot_product_attention with a preallocated KV cache), random weights, Llama-3-8B
sizes per layer (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336) and fewer layers, so
it runs anywhere without downloads. The same weights run unpatched, then patched; the greedy
tokens must agree, and the script prints which ops ran tuned kernels (hlh_mlx.tuned.explain at
the decode shapes) and which fell back. --small shrinks it for a smoke test on a CPU.
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

import hlh_mlx
from hlh_mlx import backends, paths, tuned


class Attention(nn.Module):
    def __init__(self, dims, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dims // heads
        self.q_proj = nn.Linear(dims, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dims, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dims, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, dims, bias=False)
        self.rope = nn.RoPE(self.hd, traditional=False, base=500000.0)

    def project(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.hd).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.hd).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.hd).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, q, k, v, cache, offset):
        b, _, t, _ = q.shape
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        cache[0][:, :, offset:offset + t, :] = k
        cache[1][:, :, offset:offset + t, :] = v
        keys, values = cache[0][:, :, :offset + t, :], cache[1][:, :, :offset + t, :]
        mask = "causal" if t > 1 else None
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.hd ** -0.5, mask=mask)
        return o.transpose(0, 2, 1, 3).reshape(b, t, -1)


class MLP(nn.Module):
    def __init__(self, dims, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dims, heads, kv_heads, hidden):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dims, eps=1e-5)
        self.self_attn = Attention(dims, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=1e-5)
        self.mlp = MLP(dims, hidden)

        self.qkv, self.out = self._qkv, self._out

    def _qkv(self, x):
        return self.self_attn.project(self.input_layernorm(x))

    def _out(self, x, o):
        h = x + self.self_attn.o_proj(o)
        return h + self.mlp(self.post_attention_layernorm(h))

    def compile(self):
        """The parts that do not depend on the offset, through mx.compile."""
        self.qkv, self.out = mx.compile(self._qkv), mx.compile(self._out)

    def __call__(self, x, cache, offset):
        q, k, v = self.qkv(x)
        return self.out(x, self.self_attn(q, k, v, cache, offset))


class Decoder(nn.Module):
    def __init__(self, layers, dims, heads, kv_heads, hidden, vocab):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dims)
        self.layers = [Block(dims, heads, kv_heads, hidden) for _ in range(layers)]
        self.norm = nn.RMSNorm(dims, eps=1e-5)
        self.lm_head = nn.Linear(dims, vocab, bias=False)
        self.kv_heads, self.hd = kv_heads, dims // heads

    def new_cache(self, max_len, dtype):
        shape = (1, self.kv_heads, max_len, self.hd)
        return [[mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)] for _ in self.layers]

    def __call__(self, tokens, cache, offset):
        x = self.embed_tokens(tokens)
        for layer, c in zip(self.layers, cache):
            x = layer(x, c, offset)
        return self.lm_head(self.norm(x[:, -1:, :]))


def decode(model, prompt, n_tokens, dtype, pipelined=False):
    cache = model.new_cache(prompt.shape[1] + n_tokens + 2, dtype)
    logits = model(prompt, cache, 0)
    tok = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
    mx.eval(tok, cache)
    out, offset = [], prompt.shape[1]

    def step(tok, offset):
        return mx.argmax(model(tok, cache, offset)[:, -1, :], axis=-1, keepdims=True)

    start = time.perf_counter()
    if pipelined:  # as mlx-lm's generate_step: the next token's graph is built while the GPU runs this one
        y = step(tok, offset)
        mx.async_eval(y)
        for _ in range(n_tokens):
            offset += 1
            nxt = step(y, offset)
            mx.async_eval(nxt)
            out.append(y.item())
            y = nxt
        mx.eval(y)
    else:
        for _ in range(n_tokens):
            tok = step(tok, offset)
            mx.eval(tok)
            out.append(tok.item())
            offset += 1
    return out, n_tokens / (time.perf_counter() - start)


def explain_decode(dims, heads, kv_heads, hidden, bits, dtype):
    """What hlh_mlx.tuned would run for each op at one decode step."""
    x = mx.zeros((1, 1, dims), dtype=dtype)
    q = mx.zeros((1, heads, 1, dims // heads), dtype=dtype)
    out = {"rms_norm": tuned.explain("rms_norm", x, mx.ones((dims,), dtype=dtype), 1e-5),
           "rope": tuned.explain("rope", q, dims // heads, traditional=False, base=500000.0, scale=1.0, offset=100),
           "swiglu": tuned.explain("swiglu", mx.zeros((1, 1, hidden), dtype=dtype), mx.zeros((1, 1, hidden), dtype=dtype))}
    if bits == 4:
        wq, s, b = mx.quantize(mx.zeros((hidden, dims), dtype=dtype), group_size=64, bits=4)
        out["qgemv"] = tuned.explain("qgemv", x, wq, s, b, transpose=True, group_size=64, bits=4)
    else:
        out["gemv"] = tuned.explain("gemv", x, mx.zeros((hidden, dims), dtype=dtype))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, choices=[4, 16], default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke test")
    paths.output_options(ap)
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main():
    args = parse_args()
    dims, heads, kv_heads, hidden, vocab = (256, 4, 1, 512, 1000) if args.small else (4096, 32, 8, 14336, 32000)
    dtype = mx.float16
    mx.random.seed(0)
    model = Decoder(args.layers, dims, heads, kv_heads, hidden, vocab)
    model.set_dtype(dtype)
    for layer in model.layers:  # keep activations O(1) through random layers
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight = lin.weight * 0.1
    if args.bits == 4:
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and p != "lm_head")
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, vocab, (1, args.prompt))
    modes = [(c, p) for c in (False, True) for p in (False, True)]

    def run_all(m):
        res = {}
        for compiled, pipelined in modes:
            for layer in m.layers:
                layer.compile() if compiled else setattr(layer, "qkv", layer._qkv) or setattr(layer, "out", layer._out)
            with tuned.recording():  # warm-up: kernels and traces, every distinct call decided
                decode(m, prompt, 4, dtype, pipelined)
            res[(compiled, pipelined)] = decode(m, prompt, args.tokens, dtype, pipelined)
        return res

    base = run_all(model)
    report = hlh_mlx.patch(model)
    tuned.refresh()
    before = dict(tuned.fallbacks())
    patched = run_all(model)
    fallbacks = {f"{op}: {why}": n - before.get((op, why), 0) for (op, why), n in tuned.fallbacks().items()
                 if n - before.get((op, why), 0)}
    runs = {}
    for (compiled, pipelined) in modes:
        (bt, bs), (pt, ps) = base[(compiled, pipelined)], patched[(compiled, pipelined)]
        runs[f"{'compiled' if compiled else 'uncompiled'}, {'pipelined' if pipelined else 'synchronous'}"] = {
            "tokens_per_s_builtin": round(bs, 1), "tokens_per_s_patched": round(ps, 1), "speedup": round(ps / bs, 3),
            "greedy_tokens_agree": f"{sum(a == b for a, b in zip(bt, pt))}/{len(bt)}"}
    be = backends.auto()
    result = {
        "device": backends.device(be).name, "backend": be, "mlx": mx.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": f"{args.layers} Llama-3-8B-sized layers, {'4-bit (group 64)' if args.bits == 4 else 'fp16'} weights, "
                 f"prompt {args.prompt}, {args.tokens} decode tokens" + (" (small)" if args.small else ""),
        "runs": runs,
        "replaced_layers": len(report.replaced), "kept_layers": [f"{p}: {why}" for p, _, why in report.kept],
        "fallback_distinct_calls": fallbacks,  # tuned.fallbacks(): each distinct call once, not each call
        "explain_at_decode": explain_decode(dims, heads, kv_heads, hidden, args.bits, dtype),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
