"""hlh_mlx: write, check, tune and ship custom GPU kernels for MLX."""

__version__ = "0.1.0"


def patch(model):
    """Swap matching layers of an mlx.nn.Module for tuned drop-ins; see hlh_mlx.patching."""
    from .patching import patch as _patch
    return _patch(model)


_SUBMODULES = ("tuned", "nn", "emulator", "ops", "config", "runtime", "select")


def __getattr__(name):
    """`import hlh_mlx; hlh_mlx.tuned.softmax(...)` works: submodules load on first use."""
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'hlh_mlx' has no attribute {name!r}")
