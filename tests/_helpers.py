"""Toy models shared by several test modules (a module, not a test file: importable with plain `pytest` and with
`python -m pytest`, since pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def own_cache(folder: Path) -> str:
    """A cache folder of a test's own (fingerprints, measurements, synthetic inputs) for XDG_CACHE_HOME, whose ONNX
    exports are the suite's: they are content-addressed, so sharing them changes no result, only the time spent
    tracing models another test has traced already (conftest.py names the suite's cache)."""
    exports = Path(folder) / "dfp-deploy" / "onnx"
    shared = Path(os.environ["DFP_TESTS_CACHE"]) / "dfp-deploy" / "onnx"
    shared.mkdir(parents=True, exist_ok=True)
    exports.parent.mkdir(parents=True, exist_ok=True)
    if not exports.exists():
        exports.symlink_to(shared, target_is_directory=True)
    return str(folder)


def randomise(model: nn.Module) -> None:
    """Seeded N(0, 0.3²) parameters (BatchNorm affine included) and eval mode: distinct, reproducible channels."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()


class Deep(nn.Module):
    """A plain conv-bn-relu chain: one prunable group per conv but the last one's consumer (fc, a boundary)."""

    def __init__(self, widths=(16, 24, 32, 24, 16, 32)):
        super().__init__()
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        c = 3
        for w in widths:
            self.convs.append(nn.Conv2d(c, w, 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(w))
            c = w
        self.fc = nn.Linear(c, 4)
        randomise(self)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def example() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
