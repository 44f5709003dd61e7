"""CIFAR ResNet-20/32/44/56 (He et al. 2016, "option A" shortcuts) with checkpoint-compatible module names.

Layout for depth d = 6n + 2: 3x3 stem conv 3->16, BN, ReLU; three stages of n basic blocks with widths 16, 32, 64
(the first block of stages 2 and 3 has stride 2); global average pool; Linear 64 -> num_classes.

Basic block: y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

Option A shortcut (parameter-free) when the block changes shape:
    shortcut(x) = pad_C(x[:, :, ::s, ::s], pad_before, pad_after)
i.e. spatial subsampling by the stride, then `pad_before` zero channels in front of and `pad_after` behind the
input channels. For 16 -> 32 the checkpoints were trained with 8 + 8; for 32 -> 64 with 16 + 16. Pruning the
residual stream changes these counts, so they are plain int attributes read on every call.

Parameter count (for checking): per block 2 * 9 * C^2 conv weights + 2 * 2C BN affine, plus the stem
(432 + 32) and head (64 * 10 + 10); ResNet-20 has 269,722 and ResNet-56 853,018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.core.errors import InputError

STAGE_WIDTHS = (16, 32, 64)


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, then zero-pad channels by `pad_before` / `pad_after`."""

    def __init__(self, stride: int, pad_before: int, pad_after: int):
        super().__init__()
        self.stride = int(stride)
        self.pad_before = int(pad_before)
        self.pad_after = int(pad_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads dimensions from the last backwards: (W left, W right, H top, H bottom, C front, C back)
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_before={self.pad_before}, pad_after={self.pad_after}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual add; the shortcut is an identity or a ChannelPadShortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            extra = planes - in_planes
            self.shortcut: nn.Module = ChannelPadShortcut(stride, extra // 2, extra - extra // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs; state-dict keys match the akamaster/pytorch_resnet_cifar10 checkpoints."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        blocks_per_stage = blocks_for_depth(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU()
        in_planes = STAGE_WIDTHS[0]
        for stage, planes in enumerate(STAGE_WIDTHS):
            first_stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, first_stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        # adaptive pooling (8x8 at 32x32 input) keeps the model usable at other input sizes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def blocks_for_depth(depth: int) -> int:
    """Blocks per stage n for depth 6n + 2."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise InputError(f"cifar_resnet depth {depth} is not of the form 6n+2 (e.g. 20, 32, 44, 56)")
    return (depth - 2) // 6


def _init_weights(model: nn.Module) -> None:
    # Kaiming-normal convs as in the original training recipe, so random-init models have sane activations
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build an untrained CIFAR ResNet of the given depth (eval mode is set by the loader)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"cifar_resnet num_classes must be a positive int, got {num_classes!r}")
    return CifarResNet(depth, num_classes)
