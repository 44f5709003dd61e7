"""The `--data-root` option shared by the bench scripts: where the models and image sets live.

The default is `../shared`, resolved against the repository root (the shared folder beside the checkout), so a
script finds the files from any working directory. A path option left unset is filled in under the data root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "../shared"


def add_data_root(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-root", default=DEFAULT,
                    help="folder holding models/, data/ and imagenet/ (default ../shared beside the checkout)")


def root(args: argparse.Namespace) -> Path:
    path = Path(args.data_root).expanduser()
    return path if path.is_absolute() else (REPO / path).resolve()


def fill(args: argparse.Namespace, defaults: dict[str, str]) -> argparse.Namespace:
    """Set each option in `defaults` (dest -> path relative to the data root) that was left as None."""
    base = root(args)
    for dest, rel in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, str(base / rel))
    return args
