"""Small detector-shaped models whose forward returns several tensors (a module, not a test file; recipes name them
as `tests._detectors:<factory>`)."""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyYolo(nn.Module):
    """YOLO-style: three backbone levels, a top-down neck that upsamples and concatenates twice, a detection head
    per level; returns a tuple of three [N, 5 + classes, H, W] maps (or a dict with `as_dict`)."""

    def __init__(self, classes: int = 3, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict
        self.stem = _cbr(3, 16, 2)
        self.c2, self.c3, self.c4 = _cbr(16, 24, 2), _cbr(24, 32, 2), _cbr(32, 48, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n3 = _cbr(48 + 32, 32)
        self.n2 = _cbr(32 + 24, 24)
        out = 5 + classes
        self.h2, self.h3, self.h4 = nn.Conv2d(24, out, 1), nn.Conv2d(32, out, 1), nn.Conv2d(48, out, 1)

    def forward(self, x):
        p2 = self.c2(self.stem(x))
        p3 = self.c3(p2)
        p4 = self.c4(p3)
        n3 = self.n3(torch.cat([self.up(p4), p3], 1))
        n2 = self.n2(torch.cat([self.up(n3), p2], 1))
        heads = self.h2(n2), self.h3(n3), self.h4(p4)
        return dict(zip(("p2", "p3", "p4"), heads)) if self.as_dict else heads


class TinyRetina(nn.Module):
    """RetinaNet/SSD-style: an FPN add, one head shared by two levels, per-anchor outputs flattened and concatenated
    as torchvision's detection heads return them: {"cls_logits": [N, A, classes], "bbox_regression": [N, A, 4]}."""

    def __init__(self, classes: int = 4, anchors: int = 2):
        super().__init__()
        self.classes, self.anchors = classes, anchors
        self.c1, self.c2, self.c3 = _cbr(3, 16, 2), _cbr(16, 32, 2), _cbr(32, 48, 2)
        self.lat2, self.lat3 = nn.Conv2d(32, 24, 1), nn.Conv2d(48, 24, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = _cbr(24, 24)
        self.cls = nn.Conv2d(24, anchors * classes, 3, padding=1)
        self.box = nn.Conv2d(24, anchors * 4, 3, padding=1)

    def _flat(self, t: torch.Tensor, k: int) -> torch.Tensor:
        n, _, h, w = t.shape
        return t.permute(0, 2, 3, 1).reshape(n, h * w * self.anchors, k)

    def forward(self, x):
        p2 = self.c2(self.c1(x))
        p3 = self.c3(p2)
        f3 = self.lat3(p3)
        f2 = self.lat2(p2) + self.up(f3)
        cls, box = [], []
        for f in (f2, f3):
            h = self.head(f)
            cls.append(self._flat(self.cls(h), self.classes))
            box.append(self._flat(self.box(h), 4))
        return {"cls_logits": torch.cat(cls, 1), "bbox_regression": torch.cat(box, 1)}


class Vanishing(nn.Module):
    """A classifier whose logits are ~1e-9 (as torchvision's MobileNetV2 with its default initialisation)."""

    def __init__(self):
        super().__init__()
        self.body = _cbr(3, 16)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc.weight.mul_(1e-8)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def head_scores(run, data):
    """An eval.metric: top-1 of the first anchor's class scores against labels 'y', and the mean box magnitude."""
    import numpy as np

    out = run(data["images"])
    top1 = float(np.mean(out["cls_logits"][:, 0].argmax(1) == data["y"]))
    return {"top1": 100 * top1, "box_mean_abs": float(np.abs(out["bbox_regression"]).mean())}


def returns_text(run, data):
    return "good"


def raises(run, data):
    raise ValueError("no boxes in this batch")
