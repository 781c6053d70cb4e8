"""Where templates and results live, in a checkout and in an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _package_dir(name: str) -> Path | None:
    """A data folder installed inside the package (hlh_mlx/_templates in a wheel)."""
    p = Path(__file__).resolve().parent / name.rsplit(".", 1)[-1]
    return p if p.is_dir() else None


def template_roots() -> list[Path]:
    """Shipped templates, then extra folders from $HLH_MLX_TEMPLATES (os.pathsep-separated)."""
    roots = []
    shipped = _CHECKOUT / "templates"
    if not shipped.is_dir():
        shipped = _package_dir("hlh_mlx._templates")
    if shipped:
        roots.append(shipped)
    for extra in filter(None, os.environ.get("HLH_MLX_TEMPLATES", "").split(os.pathsep)):
        roots.append(Path(extra))
    return roots


def shipped_results() -> Path | None:
    """Results that come with hlh_mlx (read-only in a wheel)."""
    p = _CHECKOUT / "variants"
    return p if p.is_dir() else _package_dir("hlh_mlx._variants")


def results_dir() -> Path:
    """Where sweeps write: $HLH_MLX_VARIANTS, else the checkout's variants/, else the user's data dir."""
    if os.environ.get("HLH_MLX_VARIANTS"):
        return Path(os.environ["HLH_MLX_VARIANTS"])
    p = _CHECKOUT / "variants"
    if p.is_dir() and os.access(p, os.W_OK):
        return p
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "hlh_mlx" / "variants"


def bench_results() -> Path:
    """Where benchmark scripts write by default: benchmarks/results/local/ in the checkout,
    which git ignores, so a run never overwrites the results the repository records (those
    are written on purpose, with --out PATH --force)."""
    return _CHECKOUT / "benchmarks" / "results" / "local"


def refuse_overwrite(files, force: bool) -> None:
    """Before a benchmark runs: a ValueError naming the first output file that already exists,
    unless `force` (scripts turn it into a usage error, so nothing is measured in vain)."""
    for f in files:
        p = Path(f)
        if p.is_dir():
            raise ValueError(f"{p} is a folder: give a file name to --out")
        if p.exists() and not force:
            raise ValueError(f"{p} exists: pass --force to overwrite it, or another --out")


def output_options(ap, default: Path | None = None, help: str = "also write the result to FILE") -> None:
    """--out FILE (alias --json) and --force on a benchmark script's argument parser."""
    ap.add_argument("--out", "--json", dest="out", metavar="FILE", type=Path, default=default,
                    help=f"{help} (refused if it exists, unless --force)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out FILE")


def parse_refusing_overwrite(ap, argv, outputs):
    """ap.parse_args(argv), then a usage error before any work if an output file exists."""
    args = ap.parse_args(argv)
    try:
        refuse_overwrite(outputs(args), args.force)
    except ValueError as e:
        ap.error(str(e))
    return args


def given_output(args) -> list[Path]:
    """The files a run writes when --out is optional: that one, or none."""
    return [args.out] if args.out else []

