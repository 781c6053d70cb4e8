"""hlh_mlx: write, check, tune and ship custom GPU kernels for MLX."""

__version__ = "0.1.0"


def patch(model):
    """Swap matching layers of an mlx.nn.Module for tuned drop-ins; see hlh_mlx.patching."""
    from .patching import patch as _patch
    return _patch(model)
