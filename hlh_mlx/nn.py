"""Drop-in layers that run hlh_mlx's tuned kernels, with mlx.nn's constructors,
parameter names and outputs, so existing weights load unchanged."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import tuned


class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization, as mlx.nn.RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight, through hlh_mlx.tuned.rms_norm.

    Args:
        dims: the feature dimension.
        eps: added inside the square root. Default: 1e-5.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return tuned.rms_norm(x, self["weight"], self.eps)


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
            return tuned.layer_norm(x, self["weight"], self["bias"], self.eps)
        return super().__call__(x)


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

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(tuned.swiglu(self.gate_proj(x), self.up_proj(x)))
