"""hlh_mlx: write, check, tune and ship custom GPU kernels for MLX."""

__version__ = "0.1.0"
