"""Drop-in layers that run hlh_mlx's tuned kernels, with mlx.nn's constructors,
parameter names and outputs, so existing weights load unchanged."""

from __future__ import annotations

from operator import is_

import mlx.core as mx
import mlx.nn as nn

from . import backends, ops, runtime, tuned
from .ops.gemv import MAX_M as GEMV_MAX_ROWS


def _planned(layer, op, x, *rest, **kwargs):
    """op(x, *rest, **kwargs) through the plan this layer used last time, when the call is
    the same but for x's values: a layer's weights and settings do not change between decode
    steps, so it skips the signature a free call builds (one shape and dtype per array).
    For a fallback the plan is the built-in itself (`Dispatch.plan_for`); whatever could
    change that (new results, strict mode turned on) bumps `runtime.generation`. An op no
    stored variant serves at any shape runs the built-in before any of that, and on a back
    end that replays kernels the op's own compiled function is that memory, at less cost
    than these checks (runtime.Dispatch._trace)."""
    d = op.dispatch
    if d._direct is not None:
        return d._direct(x, *rest, **kwargs)
    if d._traced is not None or runtime.backend() in backends.COMPILABLE:
        return op(x, *rest, **kwargs)
    last = layer.__dict__.get("_hlh_plan")
    if (last is not None and last[4] == runtime.generation[0] and last[6] is op and last[0] == x.shape
            and last[1] == x.dtype and len(last[2]) == len(rest) and all(map(is_, last[2], rest))
            and last[3] == kwargs):
        return last[5](x, *rest, **kwargs)
    plan = op.plan_for((x, *rest), kwargs)
    # kept outside the module's parameters (nn.Module is a dict of them)
    object.__setattr__(layer, "_hlh_plan", (x.shape, x.dtype, rest, dict(kwargs), runtime.generation[0], plan, op))
    return plan(x, *rest, **kwargs)


class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization, as mlx.nn.RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight, through hlh_mlx.tuned.rms_norm.

    Args:
        dims: the feature dimension.
        eps: added inside the square root. Default: 1e-5.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return _planned(self, tuned.rms_norm if self.training else tuned.rms_norm.no_grad, x, self["weight"], self.eps)


class LayerNorm(nn.LayerNorm):
    """Layer normalization, as mlx.nn.LayerNorm.

    y = (x - mean) / sqrt(var + eps) * weight + bias, through hlh_mlx.tuned.layer_norm when
    the layer has a weight and a bias (otherwise MLX's own, as mlx.nn.LayerNorm).

    Args:
        dims: the feature dimension.
        eps: added to the variance. Default: 1e-5.
        affine: learn a weight and a bias. Default: True.
        bias: learn a bias (with affine). Default: True.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self:
            f = tuned.layer_norm if self.training else tuned.layer_norm.no_grad
            return f(x, self["weight"], self["bias"], self.eps)
        return super().__call__(x)


class RoPE(nn.RoPE):
    """Rotary positional encoding, as mlx.nn.RoPE, through hlh_mlx.tuned.rope.

    Args:
        dims: the feature dimensions to rotate.
        traditional: rotate consecutive pairs (2i, 2i+1) instead of (i, i + dims/2). Default: False.
        base: the base of the frequencies. Default: 10000.
        scale: scale applied to the positions. Default: 1.0.
    """

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return (tuned.rope if self.training else tuned.rope.no_grad)(
            x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)


class Linear(nn.Linear):
    """y = x @ weight.T + bias, as mlx.nn.Linear; a few rows (decode) of a layer without a
    bias go through hlh_mlx.tuned.gemv; larger inputs, and layers with a bias (mlx.nn adds
    it inside the product, rounded once: mx.addmm), as mlx.nn.Linear.

    Args:
        input_dims: features in.
        output_dims: features out.
        bias: learn a bias. Default: True.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self or x.ndim == 0 or x.shape[-1] == 0 or x.size // x.shape[-1] > GEMV_MAX_ROWS:
            return super().__call__(x)  # mlx.nn's answer (or its error) for these
        return _planned(self, tuned.gemv if self.training else tuned.gemv.no_grad, x, self["weight"])


class QuantizedLinear(nn.QuantizedLinear):
    """A quantized linear layer, as mlx.nn.QuantizedLinear (same parameters: weight,
    scales, biases, bias); one token goes through hlh_mlx.tuned.quantized_matmul.

    Args:
        input_dims, output_dims, bias, group_size, bits, mode: as mlx.nn.QuantizedLinear.
    """

    def __call__(self, x: mx.array) -> mx.array:
        op = tuned.quantized_matmul if self.training else tuned.quantized_matmul.no_grad
        y = _planned(self, op, x, self["weight"], self["scales"], self.get("biases"), transpose=True,
                     group_size=self.group_size, bits=self.bits, mode=getattr(self, "mode", "affine"))
        return y + self["bias"] if "bias" in self else y

    @classmethod
    def from_layer(cls, layer: nn.QuantizedLinear) -> "QuantizedLinear":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k, v in layer.parameters().items():  # the same arrays, no copy
            m[k] = v
        for k in ("group_size", "bits", "mode"):
            if hasattr(layer, k):
                setattr(m, k, getattr(layer, k))
        m.freeze()
        return m


class SwiGLU(nn.Module):
    """The gated MLP of Llama-style blocks: down_proj(silu(gate_proj(x)) * up_proj(x)).

    The gate is fused through hlh_mlx.tuned.swiglu; the projections are ordinary
    (or quantized) linear layers with Llama's names, so weights load unchanged.

    Args:
        dims: input and output features.
        hidden_dims: features of the gated hidden layer.
        bias: whether the projections have a bias. Default: False.
    """

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)

    @classmethod
    def from_layers(cls, gate_proj, up_proj, down_proj) -> "SwiGLU":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.gate_proj, m.up_proj, m.down_proj = gate_proj, up_proj, down_proj
        return m

    def _fusable(self, x) -> bool:
        """One token through two 4-bit projections of one format: gate, up and SwiGLU can be
        one launch (hlh_mlx.tuned.qgemv_swiglu) that reads both weights once."""
        g, u = self.gate_proj, self.up_proj
        return (x.size == x.shape[-1] and not self.training and isinstance(g, nn.QuantizedLinear)
                and isinstance(u, nn.QuantizedLinear) and "bias" not in g and "bias" not in u
                and g.bits == u.bits and g.group_size == u.group_size
                and getattr(g, "mode", "affine") == getattr(u, "mode", "affine") == "affine"
                and "qgemv_swiglu" in ops.names())

    def __call__(self, x: mx.array) -> mx.array:
        if self._fusable(x):
            g, u = self.gate_proj, self.up_proj
            h = _planned(self, tuned.qgemv_swiglu.no_grad, x, g["weight"], g["scales"], g.get("biases"),
                         u["weight"], u["scales"], u.get("biases"), group_size=g.group_size, bits=g.bits)
            return self.down_proj(h)
        f = tuned.swiglu if self.training else tuned.swiglu.no_grad
        return self.down_proj(f(self.gate_proj(x), self.up_proj(x)))
