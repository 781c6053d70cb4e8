#!/usr/bin/env bash
# Stage mlx-lm and its dependencies for the lent GPU machine (it reaches no package
# registry): wheels for Python 3.12 into the git-ignored .device-mlx/lm (~32 MB; carry it
# with .device-mlx/env in a call after MLX itself is installed, see
# ../shared/device/README.md). numpy, jinja2 and click are already there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .device-mlx/lm && mkdir -p .device-mlx/lm
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .device-mlx/lm "mlx-lm==${1:-0.32.2}"
rm -f .device-mlx/lm/numpy-* .device-mlx/lm/mlx-* .device-mlx/lm/mlx_cuda* .device-mlx/lm/mlx_metal*
du -sh .device-mlx/lm
