"""Reproduce the reference top-1 of the built-in zoo on the shared evaluation sets (a check, not a test).

python bench/check_zoo.py                          # everything under --data-root (default ../shared)
python bench/check_zoo.py --models DIR --cifar FILE --imagenet DIR   # or name the files
Exits 1 when a number differs from the reference in <data-root>/{models,imagenet}/README.md by more than --tol.
With no path option, every set found under the data root is checked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.data import load_images, to_tensor
from dfp_deploy.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_root import add_data_root, root  # noqa: E402  (bench/data_root.py)

# reference top-1 (%) from the shared READMEs: exact932 CIFAR test images, val1300 centre-crop 224
CIFAR_REFERENCE = {
    "cifar_resnet20": ("resnet20-12fca82f.th", 91.63),
    "cifar_resnet32": ("resnet32-d509ac18.th", 93.03),
    "cifar_resnet44": ("resnet44-014dd654.th", 93.45),
    "cifar_resnet56": ("resnet56-4bfd9763.th", 92.60),
}
LITE0_WEIGHTS = "efficientnet-lite0-57934424.pth"
LITE0_IMAGES = "imagenet_val1300_acuity_jpeg.npz"
LITE0_REFERENCE = 82.69


def top1(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, preprocess, batch: int) -> float:
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            inputs = torch.from_numpy(to_tensor(x[start : start + batch], preprocess))
            correct += int((module(inputs).argmax(1).numpy() == y[start : start + batch]).sum())
    return 100.0 * correct / len(x)


def check(name: str, weights: str, data: str, reference: float, batch: int, tol: float, limit: int | None) -> bool:
    t0 = time.perf_counter()
    model = load_model(name, weights)
    x, y = load_images(data, model.preprocess, limit=limit)
    acc = top1(model.module, x, y, model.preprocess, batch)
    ok = limit is not None or abs(acc - reference) <= tol
    print(
        f"{name:20s} top-1 {acc:6.2f}  reference {reference:6.2f}  n={len(x):5d}  "
        f"{time.perf_counter() - t0:5.1f}s  {'ok' if ok else 'MISMATCH'}",
        flush=True,
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root(parser)
    parser.add_argument("--models", type=Path, help="folder with the CIFAR ResNet checkpoints")
    parser.add_argument("--cifar", type=Path, help="cifar10_test_exact932.npz")
    parser.add_argument("--imagenet", type=Path, help="folder with the lite0 checkpoint and val1300 images")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (big ones thrash at 224)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low on shared machines)")
    parser.add_argument("--tol", type=float, default=0.005, help="allowed |top-1 - reference| in points")
    parser.add_argument("--limit", type=int, default=None, help="first N images only (smoke run, no verdict)")
    args = parser.parse_args()
    if not (args.models or args.cifar or args.imagenet):
        base = root(args)
        found = lambda p: p if p.exists() else None  # noqa: E731
        args.models, args.cifar = found(base / "models"), found(base / "data" / "cifar10_test_exact932.npz")
        args.imagenet = found(base / "imagenet")
    torch.set_num_threads(args.threads)

    all_ok = True
    if args.models and args.cifar:
        for name, (weights, reference) in CIFAR_REFERENCE.items():
            all_ok &= check(name, str(args.models / weights), str(args.cifar), reference, args.batch, args.tol,
                            args.limit)
    if args.imagenet:
        all_ok &= check("efficientnet_lite0", str(args.imagenet / LITE0_WEIGHTS), str(args.imagenet / LITE0_IMAGES),
                        LITE0_REFERENCE, args.batch, args.tol, args.limit)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
